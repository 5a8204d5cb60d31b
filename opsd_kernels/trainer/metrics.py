"""Per-step metrics through accelerate's trackers: ``metrics.jsonl`` (one JSON line per logged
step; the tracker below) and, with ``tensorboard: true``, accelerate's TensorBoard tracker."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import GeneralTracker, on_main_process


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's high-water mark, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class JSONLinesTracker(GeneralTracker):
    """``{"step": N, ...metrics}`` per line, appended as the run goes (readable mid-run)."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        pass  # the config is the run's YAML / command line; metrics only here

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    @on_main_process
    def truncate_after(self, step: int) -> None:
        """Drop lines past ``step`` (a resumed run rewrites them; a fresh run starts empty)."""
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines()
                 if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in lines))


def trackers(output_dir: Path, *, tensorboard: bool) -> list[Any]:
    """What `accelerate.Accelerator(log_with=...)` gets for a run writing to ``output_dir``."""
    chosen: list[Any] = [JSONLinesTracker(output_dir / "metrics.jsonl")]
    if tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError as e:
            raise ValueError("config.tensorboard: true needs the tensorboard package "
                             "(pip install tensorboard)") from e
        chosen.append("tensorboard")
    return chosen
