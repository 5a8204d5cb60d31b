"""Every backend's implementation of an op: Triton kernels and their launchers, the native
launcher, the PyTorch form (divergence_torch.py, the CPU fallback).

The divergence row step has four ports with one contract (csrc/divergence.h; every port runs
tests/test_divergence.py) and one algorithm: log-sum-exps first, then D, the entropies and
S = sum_v g_v where S has no closed form, then the gradient g_j - p_j S; log p = (s - M) - log Z;
the top token of a row summed apart (g_top P_rest - p_top G_rest: accurate on confident rows,
tests/test_divergence.py::test_confident_rows_match_plain_pytorch); the sampled-token gradient
a (p_j - [j = y]) with p_y - 1 formed first. What still differs between the ports, and why:

- row sums: PyTorch pairwise (torch's); Triton fp32 per tile, then across tiles; CUDA fp32 per
  thread, then a warp / block tree; CPU fp32 lanes flushed into a double every 64 vectors (1).
- the row: PyTorch holds [C, V] temporaries; Triton and CUDA re-read it in every pass; the CPU
  scales it once into three scratch rows per thread.
- exp / log: torch's; tl.exp / tl.log; __expf / __logf (CUDA); ATen's Vectorized (CPU, Sleef).
- logits: PyTorch and Triton take fp32; the CPU fp32 or bf16 per role; CUDA fp32 or bf16 (a
  mixed pair runs on an fp32 copy of the bf16 role).
- without a gradient: the PyTorch step works on a copy of s; the kernels only read it.

(1) Each lane adds up to V / 16 terms in sequence: flushed into an fp32 total instead, the stats
of a 152k-column row came out with 10x the PyTorch step's error; the GPU ports' tree reductions
keep their chains short without it.
"""
