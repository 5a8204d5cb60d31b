"""Per-step metrics: one JSON line each in ``metrics.jsonl``, optionally TensorBoard."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's high-water mark, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class MetricsLogger:
    def __init__(self, output_dir: Path, *, enabled: bool, tensorboard: bool) -> None:
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("config.tensorboard: true needs the tensorboard package "
                                 "(pip install tensorboard)") from e
            self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def truncate_after(self, step: int) -> None:
        """Drop lines past ``step`` (a resumed run rewrites them)."""
        if not (self.enabled and self.path.exists()):
            return
        lines = [line for line in self.path.read_text().splitlines()
                 if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in lines))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
