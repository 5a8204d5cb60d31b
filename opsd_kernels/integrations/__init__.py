"""Integrations of the fused loss into training frameworks.

`opsd_kernels.integrations.trl`: TRL's GKD and SDFT trainers with the fused loss
(`FusedGKDTrainer`, `FusedSDFTTrainer`, and the mixins they are made of). Importing this package
imports neither TRL nor transformers; the trainer classes import TRL when first accessed.
"""

from __future__ import annotations

from typing import Any

from opsd_kernels.integrations.trl import FusedGKDMixin, FusedSDFTMixin

__all__ = ["FusedGKDMixin", "FusedGKDTrainer", "FusedSDFTMixin", "FusedSDFTTrainer"]


def __getattr__(name: str) -> Any:
    if name in ("FusedGKDTrainer", "FusedSDFTTrainer"):
        from opsd_kernels.integrations import trl

        return getattr(trl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
