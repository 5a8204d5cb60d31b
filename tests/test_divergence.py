"""The per-row divergence step: `divergence_rows_torch_`, the Triton kernel's launcher
`divergence_rows_triton_` and the native one `divergence_rows_native_` (when built), on fp32
[C, V] blocks, against the float64 oracle (bf16 blocks and the native build:
test_divergence_native.py).

Contract (every step): fill `stats` [C, NUM_STATS] completely (0 on masked rows) and, with
write_grad, overwrite the student logits with coef_i * d D_i / d z_S (0 on masked rows).
The stats buffer is poisoned with NaN before every call so that an unwritten element shows.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    DEVICE,
    HAS_NATIVE,
    HAS_TRITON,
    assert_close,
    generator,
    max_err,
    randn,
)

from opsd_kernels.divergence_options import RowOptions, TopK
from opsd_kernels.divergence_top_k import with_top_k
from opsd_kernels.ops.divergence_torch import divergence_rows_torch_
from opsd_kernels.reference.divergence import reference_stats
from opsd_kernels.types import NUM_STATS, STAT_NAMES

STEPS = {"torch": divergence_rows_torch_}
if HAS_TRITON:
    from opsd_kernels.ops.divergence import divergence_rows_triton_

    STEPS["triton"] = divergence_rows_triton_
if HAS_NATIVE:
    from opsd_kernels.ops.divergence_native import divergence_rows_native_

    STEPS["native"] = divergence_rows_native_
STEP_NAMES = list(STEPS)

KINDS = [("jsd", 0.0), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9), ("jsd", 1.0),
         ("forward_kl", 0.5), ("reverse_kl", 0.5), ("sampled", 0.5)]
KIND_IDS = [f"jsd{b}" if k == "jsd" else k for k, b in KINDS]
OPTIONS = {
    "plain": dict(),
    "temperatures": dict(tau_s=0.7, tau_t=1.3),
    "clip_0.05": dict(clip=0.05),
    "clip_small": dict(clip=0.002),
    "softcap": dict(softcap=3.0, tau_s=1.1, tau_t=1.1),
}
IGNORE = -100
EPS32 = torch.finfo(torch.float32).eps


def _opts(kind: str, beta: float, tau_s: float = 1.0, tau_t: float = 1.0, clip=None,
          softcap=None, ignore_index: int = IGNORE) -> RowOptions:
    return RowOptions.make(kind, beta, tau_s, tau_t, clip, softcap, ignore_index)


def _poisoned_stats(rows: int) -> torch.Tensor:
    return torch.full((rows, NUM_STATS), math.nan, dtype=torch.float32, device=DEVICE)


def _expected(s: torch.Tensor, t: torch.Tensor, labels, coef: torch.Tensor, opts: RowOptions,
              kind: str, dtype: torch.dtype = torch.float64):
    """Oracle stats [C, NUM_STATS] and coef_i * d D_i / d z_S, by autograd in `dtype`."""
    s_ref = s.detach().to(dtype, copy=True).requires_grad_()
    stats = reference_stats(
        s_ref, t.detach().to(dtype), labels, divergence=kind, beta=opts.beta,
        temperature=1 / opts.inv_tau_s, teacher_temperature=1 / opts.inv_tau_t, clip=opts.clip,
        logit_softcap=opts.softcap, ignore_index=opts.ignore_index)
    (stats["divergence"] * coef.to(dtype)).sum().backward()
    return torch.stack([stats[k].detach() for k in STAT_NAMES], -1), s_ref.grad


def _block(seed: int, rows: int, vocab: int, *, std: float = 2.0, masked_rows=(2,),
           labels: bool = True):
    gen = generator(seed)
    s = randn(gen, rows, vocab, scale=std)
    t = s + randn(gen, rows, vocab, scale=std / 2)
    coef = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5
    lab = None
    if labels:
        lab = torch.randint(0, vocab, (rows,), generator=gen)
        lab[-1] = vocab - 1  # the last column (last tile of the kernel)
        lab[list(masked_rows)] = IGNORE
        lab = lab.to(DEVICE)
    to = lambda x: x.float().to(DEVICE)  # noqa: E731
    return to(s), to(t), lab, to(coef)


def _run(step_name: str, s, t, labels, coef, opts: RowOptions, write_grad: bool = True):
    """Run one step on copies; returns (stats, s after the call). The teacher is only read."""
    s_out, t_in, stats = s.clone(), t.clone(), _poisoned_stats(s.shape[0])
    STEPS[step_name](s_out, t_in, labels, coef, stats, opts, write_grad)
    assert torch.equal(t_in, t) or (t_in.isnan() == t.isnan()).all(), "the teacher was modified"
    return stats, s_out


def _check(stats, grad, exp_stats, exp_grad, labels, *, grad_scale=None, stats_scale=None):
    assert not stats.isnan().any(), "stats: some elements were not written"
    assert torch.isfinite(stats).all() and torch.isfinite(grad).all()
    for i, name in enumerate(STAT_NAMES):
        # per-row values are sums of O(1) terms: judged on the scale of 1 (see conftest)
        scale = stats_scale or max(exp_stats[:, i].abs().max().item(), 1.0)
        assert_close(stats[:, i], exp_stats[:, i], scale=scale, what=f"stat {name}")
    assert_close(grad, exp_grad, scale=grad_scale, what="grad")
    if labels is not None:
        masked = labels == IGNORE
        assert (stats[masked] == 0).all(), "masked rows: stats must be exactly 0"
        assert (grad[masked] == 0).all(), "masked rows: gradient must be exactly 0"


# --- the step against the oracle ----------------------------------------------------------------


# Every step x divergence x option set, but clipping, which the sampled-token loss rejects.
STEP_CASES = [
    pytest.param(step, kind, beta, opt_name, id=f"{step}-{kind_id}-{opt_name}")
    for step in STEP_NAMES
    for (kind, beta), kind_id in zip(KINDS, KIND_IDS, strict=True)
    for opt_name in OPTIONS
    if not (kind == "sampled" and "clip" in opt_name)
]


@pytest.mark.parametrize("step, kind, beta, opt_name", STEP_CASES)
def test_row_step_matches_reference(seed, step, kind, beta, opt_name):
    opts = _opts(kind, beta, **OPTIONS[opt_name])
    s, t, labels, coef = _block(seed, 6, 300, std=5.0 if "clip" in opt_name else 2.0)
    stats, grad = _run(step, s, t, labels, coef, opts)
    _check(stats, grad, *_expected(s, t, labels, coef, opts, kind), labels)


@pytest.mark.parametrize("kind, beta", [("jsd", 0.5), ("reverse_kl", 0.5), ("forward_kl", 0.5),
                                        ("sampled", 0.5)])
@pytest.mark.parametrize("step", STEP_NAMES)
def test_row_step_without_grad(seed, step, kind, beta):
    """write_grad=False: the stats are all written and the student block is left as it was."""
    opts = _opts(kind, beta, tau_s=0.9, tau_t=1.2, clip=0.05 if kind == "jsd" else None)
    s, t, labels, coef = _block(seed, 5, 130)
    stats, s_after = _run(step, s, t, labels, coef, opts, write_grad=False)
    assert torch.equal(s_after, s)
    exp_stats, _ = _expected(s, t, labels, coef, opts, kind)
    assert not stats.isnan().any()
    for i, name in enumerate(STAT_NAMES):
        assert_close(stats[:, i], exp_stats[:, i], scale=max(exp_stats[:, i].abs().max(), 1.0),
                     what=f"stat {name}")


@pytest.mark.parametrize("kind", ["jsd", "forward_kl", "reverse_kl"])
@pytest.mark.parametrize("step", STEP_NAMES)
def test_row_step_without_labels(seed, step, kind):
    """labels=None: every row counts; label log-probs are written as 0."""
    opts = _opts(kind, 0.3)
    s, t, _, coef = _block(seed, 5, 97, labels=False)
    stats, grad = _run(step, s, t, None, coef, opts)
    _check(stats, grad, *_expected(s, t, None, coef, opts, kind), None)
    assert (stats[:, STAT_NAMES.index("student_logprob")] == 0).all()
    assert (stats[:, STAT_NAMES.index("teacher_logprob")] == 0).all()


@pytest.mark.parametrize("kind, beta", [("jsd", 0.5), ("forward_kl", 0.5), ("sampled", 0.5),
                                        ("reverse_kl", 0.5)])
@pytest.mark.parametrize("step", STEP_NAMES)
def test_row_step_several_vocab_tiles(seed, step, kind, beta):
    """V spans more than two of the kernel's vocab tiles (the last one partial): the online
    log-sum-exp rescaling across tiles, and a label in the last tile."""
    block = 4096 if DEVICE.type == "cuda" else 1024
    opts = _opts(kind, beta, tau_s=1.2, tau_t=0.8, clip=0.05 if kind == "jsd" else None)
    s, t, labels, coef = _block(seed, 4, 2 * block + 37, std=3.0, masked_rows=(1,))
    # the row maxima in different tiles for different rows
    for r in range(4):
        s[r, (r * 977) % s.shape[1]] += 8.0
        t[r, (r * 1531 + 5) % s.shape[1]] += 8.0
    stats, grad = _run(step, s, t, labels, coef, opts)
    _check(stats, grad, *_expected(s, t, labels, coef, opts, kind), labels)


@pytest.mark.parametrize("step", STEP_NAMES)
def test_row_step_strided_rows(seed, step):
    """Row blocks with a row stride larger than V (views into wider buffers): the step reads
    and writes only the first V columns of each row."""
    s, t, labels, coef = _block(seed, 5, 77)
    pad = 11
    s_buf = torch.full((5, 77 + pad), 123.0, device=DEVICE)
    t_buf = torch.full((5, 77 + pad), -7.0, device=DEVICE)
    s_buf[:, :77], t_buf[:, :77] = s, t
    s_view, t_view = s_buf[:, :77], t_buf[:, :77]
    assert s_view.stride(0) == 77 + pad
    opts = _opts("jsd", 0.4, clip=0.05)
    stats = _poisoned_stats(5)
    STEPS[step](s_view, t_view, labels, coef, stats, opts, True)
    assert (s_buf[:, 77:] == 123.0).all() and (t_buf[:, 77:] == -7.0).all()
    assert torch.equal(t_buf[:, :77], t)
    _check(stats, s_buf[:, :77], *_expected(s, t, labels, coef, opts, "jsd"), labels)


@pytest.mark.parametrize("top_k, tail", [(7, False), (7, True), (1, True)])
@pytest.mark.parametrize("step", STEP_NAMES)
def test_top_k_row_step(seed, step, top_k, tail):
    """The top-k path of the chunked driver (gather, row step on the support, scatter back):
    every stat written, the gradient vs the oracle, zeros off the support (without a tail)."""
    opts = _opts("jsd", 0.5, tau_s=0.9, tau_t=1.1, softcap=6.0)
    s, t, labels, coef = _block(seed, 6, 101)
    s_out, stats = s.clone(), _poisoned_stats(6)
    top_k_step = with_top_k(STEPS[step], TopK(top_k, "teacher", tail))
    top_k_step(s_out, t.clone(), labels, coef, stats, opts, True)
    s_ref = s.double().requires_grad_()
    ref = reference_stats(s_ref, t.double(), labels, divergence="jsd", beta=0.5, temperature=0.9,
                          teacher_temperature=1.1, top_k=top_k, tail_bucket=tail,
                          logit_softcap=6.0)
    (ref["divergence"] * coef.double()).sum().backward()
    exp_stats = torch.stack([ref[k].detach() for k in STAT_NAMES], -1)
    _check(stats, s_out, exp_stats, s_ref.grad, labels)
    if not tail:
        support = torch.zeros_like(s, dtype=torch.bool).scatter_(
            -1, (t / 1.1).topk(top_k, -1).indices, True)
        assert (s_out[~support] == 0).all()


# --- masked rows --------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("step", STEP_NAMES)
def test_masked_rows_may_hold_garbage(seed, step, garbage):
    """An ignored row is never part of the loss: whatever its logits hold (padding positions
    can carry non-finite hidden states), its stats and its gradient are exactly 0, and the
    other rows are unaffected. (The Triton kernel never reads masked rows.)"""
    opts = _opts("jsd", 0.5)
    s, t, labels, coef = _block(seed, 5, 64, masked_rows=(1, 3))
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[[1, 3]] = garbage
    t_bad[[1, 3]] = garbage
    stats, grad = _run(step, s_bad, t_bad, labels, coef, opts)
    assert (stats[[1, 3]] == 0).all()
    assert (grad[[1, 3]] == 0).all(), f"masked rows: gradient {grad[[1, 3]]} instead of 0"
    _check(stats, grad, *_expected(s, t, labels, coef, opts, "jsd"), labels)


@pytest.mark.parametrize("step", STEP_NAMES)
def test_all_rows_masked(seed, step):
    s, t, labels, coef = _block(seed, 4, 50)
    labels = torch.full_like(labels, IGNORE)
    for kind in ("jsd", "forward_kl", "sampled"):
        stats, grad = _run(step, s, t, labels, coef, _opts(kind, 0.5))
        assert (stats == 0).all() and (grad == 0).all()


# --- numerical edge cases -----------------------------------------------------------------------

EDGE_KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9),
              ("sampled", 0.5)]
EDGE_IDS = [f"jsd{b}" if k == "jsd" else k for k, b in EDGE_KINDS]


def _ulp_scale(*blocks: torch.Tensor) -> float:
    """Rounding of fp32 numbers of the size of the largest scaled logit: the accuracy any fp32
    log-softmax of these logits can have."""
    return 8 * EPS32 * max(b.abs().max().item() for b in blocks)


@pytest.mark.parametrize("kind, beta", EDGE_KINDS, ids=EDGE_IDS)
@pytest.mark.parametrize("step", STEP_NAMES)
def test_very_large_logits(seed, step, kind, beta):
    """|z| ~ 1e4 in fp32 (peaked, far apart distributions): finite, and within fp32 rounding of
    numbers of that size of the oracle."""
    gen = generator(seed)
    s = (randn(gen, 6, 200, scale=1e4)).float().to(DEVICE)
    t = (randn(gen, 6, 200, scale=1e4)).float().to(DEVICE)
    labels = torch.randint(0, 200, (6,), generator=gen).to(DEVICE)
    labels[0] = IGNORE
    coef = torch.rand(6, generator=gen).to(DEVICE) + 0.5
    opts = _opts(kind, beta)
    stats, grad = _run(step, s, t, labels, coef, opts)
    exp_stats, exp_grad = _expected(s, t, labels, coef, opts, kind)
    assert torch.isfinite(stats).all() and torch.isfinite(grad).all()
    rel = _ulp_scale(s, t)
    for i, name in enumerate(STAT_NAMES):
        col = exp_stats[:, i]
        assert max_err(stats[:, i], col) <= rel * max(col.abs().max().item(), 1.0), name
    assert max_err(grad, exp_grad) <= rel * max(exp_grad.abs().max().item(), 1e-3)


@pytest.mark.parametrize("kind, beta", EDGE_KINDS, ids=EDGE_IDS)
@pytest.mark.parametrize("step", STEP_NAMES)
def test_tiny_temperature(seed, step, kind, beta):
    """temperature 1e-3 for both roles (scaled logits ~1e3..1e4, one-hot distributions):
    finite, and within fp32 rounding of numbers of that size of the oracle. (Each row's top
    logit is kept 0.1 above the rest; near-ties are `test_confident_rows_match_plain_pytorch`.)"""
    s, t, labels, coef = _block(seed, 6, 200, std=2.0)
    for x in (s, t):
        x.scatter_add_(-1, x.argmax(-1, keepdim=True), torch.full((6, 1), 0.1, device=DEVICE))
    opts = _opts(kind, beta, tau_s=1e-3, tau_t=1e-3)
    stats, grad = _run(step, s, t, labels, coef, opts)
    exp_stats, exp_grad = _expected(s, t, labels, coef, opts, kind)
    assert torch.isfinite(stats).all() and torch.isfinite(grad).all()
    rel = _ulp_scale(s * 1e3, t * 1e3)
    for i, name in enumerate(STAT_NAMES):
        col = exp_stats[:, i]
        assert max_err(stats[:, i], col) <= rel * max(col.abs().max().item(), 1.0), name
    assert max_err(grad, exp_grad) <= rel * max(exp_grad.abs().max().item(), 1e-3)


def _confident_rows(seed: int, cause: str):
    """fp32 logits whose scaled values are ~1e4 in size while the distributions are not
    degenerate: a tiny temperature with the student's top token only 11 (scaled) above the
    second (p_top = 1 - 1.7e-5), or a large common offset."""
    gen = generator(seed)
    rows, vocab = 6, 200
    if cause == "large_offset":
        s = 1e4 + randn(gen, rows, vocab, scale=3.0)
        t = 1e4 + randn(gen, rows, vocab, scale=3.0)
        return s.float().to(DEVICE), t.float().to(DEVICE), 1.0
    s, t = randn(gen, rows, vocab, scale=2.0), randn(gen, rows, vocab, scale=2.0)
    top2 = s.topk(2, -1)
    s.scatter_(-1, top2.indices[:, :1], top2.values[:, 1:] + 0.011)
    return s.float().to(DEVICE), t.float().to(DEVICE), 1e-3


CONFIDENT_CASES = [("tiny_temperature", "reverse_kl", 0.5), ("tiny_temperature", "jsd", 0.5),
                   ("tiny_temperature", "jsd", 0.1), ("large_offset", "forward_kl", 0.5),
                   ("large_offset", "reverse_kl", 0.5)]


@pytest.mark.parametrize("cause, kind, beta", CONFIDENT_CASES,
                         ids=[f"{c}-{k}{b}" for c, k, b in CONFIDENT_CASES])
@pytest.mark.parametrize("step", STEP_NAMES)
def test_confident_rows_match_plain_pytorch(seed, step, cause, kind, beta):
    """Plain fp32 PyTorch (log_softmax subtracts the row maximum exactly) is accurate on these
    rows; the step must be within 2x of its error vs float64 (the flash-attention rule, in
    fp32) plus a floor of 1e-5 of the values' size. Computing log p = s - lse with lse rounded
    at the size of the logits instead (ulp(5e3) = 5e-4) makes 1 - p_top 0 or 30x too large;
    reverse KL's gradient on the top token, g_top (1 - p_top) - p_top g_rest, then loses
    everything; even with log p exact, g_top - p_top S loses most digits unless the top token is
    summed apart, g_top P_rest - p_top G_rest (every step does). The gradient and divergence on
    several draws per case (one draw can pass by luck), every stat on the first."""
    for draw in range(4):
        s, t, tau = _confident_rows(seed + 1000 * draw, cause)
        gen = generator(seed + 1000 * draw + 1)
        labels = torch.randint(0, s.shape[1], (6,), generator=gen).to(DEVICE)
        coef = (torch.rand(6, generator=gen) + 0.5).to(DEVICE)
        opts = _opts(kind, beta, tau_s=tau, tau_t=tau)
        stats, grad = _run(step, s, t, labels, coef, opts)
        exp_stats, exp_grad = _expected(s, t, labels, coef, opts, kind)
        base_stats, base_grad = _expected(s, t, labels, coef, opts, kind, torch.float32)
        checks = [("grad", grad, base_grad, exp_grad)]
        checks += [(n, stats[:, i], base_stats[:, i], exp_stats[:, i])
                   for i, n in enumerate(STAT_NAMES)
                   if not n.endswith("lse") and (draw == 0 or n == "divergence")]
        for name, ours, base, exp in checks:
            err, base_err = max_err(ours, exp), max_err(base, exp)
            floor = 1e-5 * max(exp.abs().max().item(), 1e-2)
            assert err <= 2 * base_err + floor, (
                f"draw {draw}, {name}: error {err:.2e} vs plain fp32 {base_err:.2e}")


@pytest.mark.parametrize("kind, beta", EDGE_KINDS, ids=EDGE_IDS)
@pytest.mark.parametrize("step", STEP_NAMES)
def test_both_underflow_on_part_of_vocab(seed, step, kind, beta):
    """Logits -1e4 on a third of the columns for both roles: p and q underflow to exactly 0
    there (so does the JSD mixture m): no NaN (Liger #1453), zero gradient on those columns,
    and the same values as on the vocabulary without them."""
    s, t, labels, coef = _block(seed, 6, 150)
    gen = generator(seed + 7)
    dead = torch.rand(150, generator=gen) < 1 / 3
    dead[labels[labels != IGNORE]] = False  # the sampled tokens keep their mass
    dead = dead.to(DEVICE)
    s[:, dead] = -1e4
    t[:, dead] = -1e4
    opts = _opts(kind, beta, clip=0.05 if kind == "reverse_kl" else None)
    stats, grad = _run(step, s, t, labels, coef, opts)
    assert not stats.isnan().any() and torch.isfinite(grad).all()
    assert (grad[:, dead] == 0).all()
    _check(stats, grad, *_expected(s, t, labels, coef, opts, kind), labels)
    # the dead columns change nothing but the label indices
    keep = ~dead
    new_index = torch.cumsum(keep.long(), 0) - 1
    lab_k = torch.where(labels == IGNORE, labels, new_index[labels.clamp_min(0)])
    stats_k, grad_k = _run(step, s[:, keep].contiguous(), t[:, keep].contiguous(), lab_k, coef,
                           opts)
    assert_close(stats, stats_k, scale=max(stats_k.abs().max().item(), 1.0),
                 what="stats without the dead columns")
    assert_close(grad[:, keep], grad_k, what="grad without the dead columns")


@pytest.mark.parametrize("offset", [-103.0, -103.5])
@pytest.mark.parametrize("role", ["student", "teacher"])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("step", STEP_NAMES)
def test_jsd_mixture_with_subnormal_mass(step, beta, role, offset):
    """One role puts a subnormal probability (~1e-45, log p ~ -103) on a token where the other
    has none. The mixture m = beta q + (1 - beta) p then rounds to 0 in fp32 while p > 0, so a
    mixture formed in probability space gives p log(p / m) = +inf; in log space
    (logaddexp(log p + log(1 - beta), log q + log beta)) it is finite. Loss, stats and gradient
    must stay finite and match the oracle (whose value here is ~1e-46)."""
    vocab = 64
    s = torch.zeros(3, vocab, device=DEVICE)
    t = torch.zeros(3, vocab, device=DEVICE)
    near, zero = (s, t) if role == "student" else (t, s)
    near[:, 0] = offset + math.log(vocab)  # probability ~ e^offset
    zero[:, 0] = -300.0  # probability exactly 0 in fp32
    s[1, 5] += 1.0  # rows that differ elsewhere too
    t[2, 9] += 1.0
    labels = torch.tensor([0, 5, IGNORE], device=DEVICE)
    coef = torch.tensor([0.7, 1.3, 1.0], device=DEVICE)
    opts = _opts("jsd", beta)
    stats, grad = _run(step, s, t, labels, coef, opts)
    _check(stats, grad, *_expected(s, t, labels, coef, opts, "jsd"), labels)


@pytest.mark.parametrize("softcap", [None, 4.0], ids=["no_softcap", "softcap"])
@pytest.mark.parametrize("kind, beta", EDGE_KINDS, ids=EDGE_IDS)
@pytest.mark.parametrize("step", STEP_NAMES)
def test_neg_inf_columns(seed, step, kind, beta, softcap):
    """-inf logits in some columns for both roles (vocabulary padding done right): finite
    stats and gradients, gradient 0 there; without soft-capping the same as the vocabulary
    without those columns; with it (tanh(-inf) = -1) the oracle's value."""
    s, t, labels, coef = _block(seed, 6, 120)
    dead = torch.zeros(120, dtype=torch.bool, device=DEVICE)
    dead[-17:] = True  # padding at the end, and a few inside
    dead[[3, 50, 51]] = True
    labels = torch.where((labels >= 0) & dead[labels.clamp_min(0)], 10, labels)
    s[:, dead] = -math.inf
    t[:, dead] = -math.inf
    opts = _opts(kind, beta, tau_s=0.9, tau_t=0.9, softcap=softcap)
    stats, grad = _run(step, s, t, labels, coef, opts)
    assert not stats.isnan().any(), "stats: NaN"
    assert torch.isfinite(stats).all() and torch.isfinite(grad).all()
    assert (grad[:, dead] == 0).all()
    if softcap is not None:
        _check(stats, grad, *_expected(s, t, labels, coef, opts, kind), labels)
        return
    keep = ~dead
    new_index = torch.cumsum(keep.long(), 0) - 1
    lab_k = torch.where(labels == IGNORE, labels, new_index[labels.clamp_min(0)])
    exp_stats, exp_grad_k = _expected(s[:, keep], t[:, keep], lab_k, coef, opts, kind)
    exp_grad = torch.zeros_like(s, dtype=torch.float64)
    exp_grad[:, keep] = exp_grad_k
    _check(stats, grad, exp_stats, exp_grad, labels)
