"""opsd-kernels: fused kernels for on-policy (self-)distillation of language models.

Importing the package never initialises CUDA and needs neither Triton nor the native extension.
The Hugging Face integration lives in `opsd_kernels.prefix` (imported on demand).
"""

from opsd_kernels._backend import env_report
from opsd_kernels.attention import shared_prefix_attention
from opsd_kernels.losses import (
    DivergenceStats,
    FusedLinearDivergenceLoss,
    divergence,
    divergence_stats,
    fused_linear_divergence,
)

__version__ = "0.1.0"

__all__ = [
    "DivergenceStats",
    "FusedLinearDivergenceLoss",
    "divergence",
    "divergence_stats",
    "env_report",
    "fused_linear_divergence",
    "shared_prefix_attention",
]
