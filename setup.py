"""Build of opsd-kernels.

The package is pure Python + Triton. The native extension opsd_kernels._C (csrc/ kernels,
python/ pybind11 bindings) is built by CMake with the Ninja generator against the torch that is
already installed, so install with build isolation off (the Makefile does):

    pip install pybind11 ninja            # cmake >= 3.18 too, if the machine has none
    pip install --no-build-isolation -e .

The extension is optional: when it cannot be built (torch not importable in the build
environment, no pybind11 / CMake / compiler, a compile error) setup.py warns, writes why into
opsd_kernels/_native_build.txt, and the package still installs and imports; backend="auto"
then uses the PyTorch backend and `opsd env` says why native is missing.
Knobs: OPSD_NO_NATIVE=1 skips the build; OPSD_CMAKE_ARGS adds CMake arguments; MAX_JOBS caps
the parallel compile jobs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PACKAGE = "opsd_kernels"
BUILD_NOTE = "_native_build.txt"  # why the last build left no extension (absent when it did)
MIN_CMAKE = (3, 18)


class BuildError(Exception):
    pass


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        # optional: setuptools copies nothing (and fails nothing) when no library was made.
        super().__init__(name, sources=[], optional=True)


def _tool(module: str, attr: str, exe: str) -> str | None:
    """A build tool from its pip package if installed, else from PATH."""
    try:
        mod = __import__(module)
        path = Path(getattr(mod, attr)) / exe
        if path.exists():
            return str(path)
    except (ImportError, AttributeError):
        pass
    return shutil.which(exe)


def _cmake() -> str:
    cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
    if cmake is None:
        raise BuildError("CMake was not found (pip install cmake, or install it system-wide)")
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"(\d+)\.(\d+)", out)
    if match is None or tuple(map(int, match.groups())) < MIN_CMAKE:
        raise BuildError(f"CMake >= {'.'.join(map(str, MIN_CMAKE))} is needed, found "
                         f"{out.splitlines()[0] if out else cmake}")
    return cmake


def _torch_and_pybind11() -> tuple[str, str]:
    """(CMAKE_PREFIX_PATH for torch and pybind11, a key of this Python + torch)."""
    try:
        import torch.utils
    except ImportError as err:
        raise BuildError(f"torch is not importable in the build environment ({err}); install "
                         "with `pip install --no-build-isolation`") from None
    try:
        import pybind11
    except ImportError:
        raise BuildError("pybind11 is not installed (pip install pybind11)") from None
    key = f"{sys.executable}|{torch.__version__}|{torch.__file__}"
    return (f"{torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            hashlib.sha1(key.encode()).hexdigest()[:10])


def _first_error(output: str) -> str:
    """The line a person needs first: CMake's error (with its message) or the compiler's."""
    lines = [ln.strip() for ln in output.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("CMake Error"):
            return " ".join([line] + [x for x in lines[i + 1 : i + 8] if x])[:400]
    for marker in ("error:", "FAILED:"):
        hit = next((ln for ln in lines if marker in ln.lower() or ln.startswith(marker)), None)
        if hit is not None:
            return hit[:400]
    return next((ln for ln in reversed(lines) if ln), "no output")


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        output = proc.stdout + "\n" + proc.stderr
        tail = "\n".join(output.strip().splitlines()[-40:])
        raise BuildError(f"{what} failed: {_first_error(output)}\n--- last lines of "
                         f"{' '.join(cmd[:2])} ... ---\n{tail}")


class CMakeBuild(build_ext):
    def run(self) -> None:
        # setuptools builds with inplace off and copies afterwards; remember where it copies.
        self._to_source = bool(self.inplace or getattr(self, "editable_mode", False))
        super().run()

    def build_extension(self, ext: Extension) -> None:
        dest = Path(self.get_ext_fullpath(ext.name)).resolve()
        try:
            if os.environ.get("OPSD_NO_NATIVE") == "1":
                raise BuildError("the build was skipped (OPSD_NO_NATIVE=1)")
            self._cmake_build(dest)
        except BuildError as err:
            self._note(str(err), dest)
            warnings.warn(f"opsd_kernels: the native extension was not built; backend='auto' "
                          f"will use PyTorch. Reason: {err}", stacklevel=1)
            print(f"WARNING: opsd_kernels native extension not built: {err}", file=sys.stderr)
        else:
            self._note(None, dest)

    def _cmake_build(self, dest: Path) -> None:
        cmake = _cmake()
        prefix, key = _torch_and_pybind11()
        # A fixed directory per Python + torch (pip's editable builds use a fresh build_temp
        # each time): rebuilds are incremental, and a CMake cache never outlives its torch.
        build_dir = ROOT / "build" / f"cmake-{key}"
        out_dir = build_dir / "out"
        shutil.rmtree(out_dir, ignore_errors=True)
        configure = [cmake, "-S", str(ROOT), "-B", str(build_dir),
                     "-DCMAKE_BUILD_TYPE=Release", f"-DPython3_EXECUTABLE={sys.executable}",
                     f"-DCMAKE_PREFIX_PATH={prefix}", f"-DOPSD_OUTPUT_DIR={out_dir}"]
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        if ninja is not None and not (build_dir / "Makefile").exists():
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        configure += os.environ.get("OPSD_CMAKE_ARGS", "").split()
        try:
            _run(configure, "CMake configure")
        except BuildError:
            shutil.rmtree(build_dir, ignore_errors=True)  # no bad cache for the next attempt
            raise
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        _run([cmake, "--build", str(build_dir), "--parallel", jobs], "CMake build")
        built = sorted(out_dir.glob("_C*.so")) + sorted(out_dir.glob("_C*.pyd"))
        if not built:
            raise BuildError(f"CMake produced no _C library in {out_dir} (no native sources?)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], dest)

    def _note(self, why: str | None, dest: Path) -> None:
        """Record why there is no extension (or clear the record), where the package is."""
        dirs = {dest.parent}
        if self._to_source:
            dirs.add(ROOT / PACKAGE)
        for d in dirs:
            note = d / BUILD_NOTE
            if why is None:
                note.unlink(missing_ok=True)
                continue
            d.mkdir(parents=True, exist_ok=True)
            note.write_text(why + "\n")
            # A library left by an earlier build (in the tree, or copied from it into the
            # wheel's staging directory) would hide this failure.
            for stale in d.glob("_C.*"):
                if stale.suffix in (".so", ".pyd"):
                    stale.unlink()


setup(
    ext_modules=[CMakeExtension(f"{PACKAGE}._C")],
    cmdclass={"build_ext": CMakeBuild},
)
