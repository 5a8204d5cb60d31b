"""Names the public API and every backend share, each spelled once: the string options, and
the columns of the per-token statistics (Python, Triton and, checked when it loads, C++)."""

from enum import IntEnum
from typing import Literal, NamedTuple

import torch

DivergenceKind = Literal["jsd", "forward_kl", "reverse_kl", "sampled"]
TopKSource = Literal["teacher", "student"]
Reduction = Literal["mean", "sum", "none", "sequence_mean"]
Backend = Literal["auto", "triton", "native", "torch"]

DIVERGENCES: tuple[str, ...] = ("jsd", "forward_kl", "reverse_kl", "sampled")
TOP_K_SOURCES: tuple[str, ...] = ("teacher", "student")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none", "sequence_mean")
BACKENDS: tuple[str, ...] = ("auto", "triton", "native", "torch")


class DivergenceStats(NamedTuple):
    """Per-token by-products, each shaped like the token dims of the input; 0 on masked tokens.

    divergence: the per-token loss D_i (before token weights). student_entropy / teacher_entropy:
    entropies of the distributions the divergence compares (on the top-k support when top_k is
    set). student_lse / teacher_lse: log-sum-exp of the full scaled logits. student_logprob /
    teacher_logprob: full-vocabulary log-probabilities of the label (0 without labels).
    """

    divergence: torch.Tensor
    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor
    student_lse: torch.Tensor
    teacher_lse: torch.Tensor
    student_logprob: torch.Tensor
    teacher_logprob: torch.Tensor


# Every backend writes the stats as one fp32 [N, NUM_STATS] block, a column per field above.
STAT_NAMES: tuple[str, ...] = DivergenceStats._fields
NUM_STATS = len(STAT_NAMES)
StatColumn = IntEnum("StatColumn", [(name, i) for i, name in enumerate(STAT_NAMES)])
