"""String options of the public API, spelled once."""

from typing import Literal

DivergenceKind = Literal["jsd", "forward_kl", "reverse_kl", "sampled"]
TopKSource = Literal["teacher", "student"]
Reduction = Literal["mean", "sum", "none", "sequence_mean"]
Backend = Literal["auto", "triton", "native", "torch"]

DIVERGENCES: tuple[str, ...] = ("jsd", "forward_kl", "reverse_kl", "sampled")
TOP_K_SOURCES: tuple[str, ...] = ("teacher", "student")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none", "sequence_mean")
BACKENDS: tuple[str, ...] = ("auto", "triton", "native", "torch")

# Columns of the per-token statistics every backend writes ([N, NUM_STATS] fp32).
STAT_NAMES: tuple[str, ...] = (
    "divergence",
    "student_entropy",
    "teacher_entropy",
    "student_lse",
    "teacher_lse",
    "student_logprob",
    "teacher_logprob",
)
NUM_STATS = len(STAT_NAMES)
