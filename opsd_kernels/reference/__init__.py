"""Plain PyTorch implementations: CPU fallback, test oracle and benchmark baseline."""

from opsd_kernels.reference.divergence import reference_reduce, reference_stats

__all__ = ["reference_reduce", "reference_stats"]
