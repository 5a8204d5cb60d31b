"""opsd-kernels: fused kernels for on-policy (self-)distillation of language models.

Importing the package never initialises CUDA and needs neither Triton nor the native extension.
The public names below load their modules (and torch) on first use, so the `opsd` command can
parse its arguments and answer --help without importing torch.
The Hugging Face integration lives in `opsd_kernels.prefix` (imported on demand).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opsd_kernels._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module defining it
_EXPORTS = {
    "DivergenceStats": "opsd_kernels.losses",
    "FusedLinearDivergenceLoss": "opsd_kernels.losses",
    "divergence": "opsd_kernels.losses",
    "divergence_stats": "opsd_kernels.losses",
    "env_report": "opsd_kernels._backend",
    "fused_linear_divergence": "opsd_kernels.losses",
    "fused_linear_logprobs": "opsd_kernels.logprobs",
    "shared_prefix_attention": "opsd_kernels.attention",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the names for type checkers ("as" marks them re-exported)
    from opsd_kernels._backend import env_report as env_report
    from opsd_kernels.attention import shared_prefix_attention as shared_prefix_attention
    from opsd_kernels.logprobs import fused_linear_logprobs as fused_linear_logprobs
    from opsd_kernels.losses import DivergenceStats as DivergenceStats
    from opsd_kernels.losses import FusedLinearDivergenceLoss as FusedLinearDivergenceLoss
    from opsd_kernels.losses import divergence as divergence
    from opsd_kernels.losses import divergence_stats as divergence_stats
    from opsd_kernels.losses import fused_linear_divergence as fused_linear_divergence


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
