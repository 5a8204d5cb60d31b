"""The implementations the benchmark compares, all run on identical inputs.

Every peer is built once per case and returns a ``step`` callable doing one forward + backward.
After ``step()`` the student hidden ``h_s.grad`` (and ``w.grad`` when the head is trainable)
hold the gradients; ``step`` returns the detached loss, or None for the GEMM floor, which
computes no loss. Peers that cannot run here (no CUDA, package missing) give a skip reason
instead of failing, so one suite runs everywhere.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
Step = Callable[[], "torch.Tensor | None"]


@dataclass(frozen=True)
class Case:
    """One benchmark configuration; the loss is always generalized JSD (the costliest form)."""

    n: int
    h: int
    v: int
    dtype: torch.dtype
    device: torch.device
    train_weight: bool = False
    beta: float = 0.5
    temperature: float = 1.0
    ignore_frac: float = 0.125  # prompt/padding rows, so every peer exercises its mask path

    @property
    def label(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        head = "trainW" if self.train_weight else "frozenW"
        return f"N{self.n}-H{self.h}-V{self.v}-{dt}-{head}"


@dataclass
class Inputs:
    h_s: torch.Tensor  # [N, H] student hidden, requires grad
    w: torch.Tensor  # [V, H] lm_head shared by both roles
    h_t: torch.Tensor  # [N, H] teacher hidden, no grad
    labels: torch.Tensor  # [N] int64, IGNORE_INDEX where masked


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        # Drawn on CPU in fp32 so every device and dtype sees the same numbers.
        x = torch.randn(*shape, generator=g) * scale
        return x.to(device=case.device, dtype=case.dtype)

    # Scales give logits of std ~2: peaked but not one-hot distributions, like a trained LM.
    h_s = randn(case.n, case.h, scale=1.0).requires_grad_()
    h_t = h_s.detach() + randn(case.n, case.h, scale=0.5)  # teacher close to the student
    w = randn(case.v, case.h, scale=2.0 / math.sqrt(case.h)).requires_grad_(case.train_weight)
    labels = torch.randint(0, case.v, (case.n,), generator=g)
    labels[torch.rand(case.n, generator=g) < case.ignore_frac] = IGNORE_INDEX
    return Inputs(h_s, w, h_t, labels.to(case.device))


# ---------------------------------------------------------------- naive: TRL on full logits


def _trl_jsd() -> Callable[..., torch.Tensor]:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


def build_naive(inp: Inputs, case: Case) -> Step:
    """What a GKD/OPSD trainer does today: whole [N, V] logits, TRL's loss, autograd.

    Logits stay in the model dtype, as a Hugging Face model returns them to the trainer.
    """
    jsd = _trl_jsd()

    def step() -> torch.Tensor:
        z_s = inp.h_s @ inp.w.T
        with torch.no_grad():
            z_t = inp.h_t @ inp.w.T
        # TRL documents [B, T, V]; a batch of one keeps us on its documented path.
        loss = jsd(
            z_s[None],
            z_t[None],
            labels=inp.labels[None],
            beta=case.beta,
            temperature=case.temperature,
        )
        loss.backward()
        return loss.detach()

    return step


# ------------------------------------------------- torch.compile of a plain chunked form


def _chunk_rows(case: Case) -> int:
    # Liger's chunked-loss default on GPU; on CPU a 256-row chunk keeps the fp32 workspace
    # (~C*V*4 bytes per tensor) near 32 MB at V=32k, the same budget spirit as a fused loss.
    return 1024 if case.device.type == "cuda" else 256


def build_torch_compile_chunked(inp: Inputs, case: Case) -> Step:
    """The best one can do without a custom kernel: per-chunk logits, TRL's JSD, per-chunk
    autograd (so no chunk's activations outlive its iteration), all under torch.compile.

    Chunk logits are upcast to fp32, as any careful hand-written chunked loss would do.
    """
    jsd = _trl_jsd()
    beta, tau = case.beta, case.temperature

    def chunk_loss(
        h_s: torch.Tensor,
        w: torch.Tensor,
        h_t: torch.Tensor,
        labels: torch.Tensor,
        count: torch.Tensor,
    ) -> torch.Tensor:
        z_s = (h_s @ w.T).float()
        with torch.no_grad():
            z_t = (h_t @ w.T).float()
        # reduction="none" and masking here: TRL's boolean-index masking would give the
        # compiler a data-dependent shape.
        per_elem = jsd(z_s, z_t, labels=None, beta=beta, temperature=tau, reduction="none")
        mask = (labels != IGNORE_INDEX).to(per_elem.dtype)
        return (per_elem.sum(-1) * mask).sum() / count

    compiled = torch.compile(chunk_loss, dynamic=False)
    rows = _chunk_rows(case)

    def step() -> torch.Tensor:
        head = [inp.w] if inp.w.requires_grad else []
        grad_h = torch.empty_like(inp.h_s)
        grad_w = torch.zeros_like(inp.w, dtype=torch.float32) if inp.w.requires_grad else None
        # A tensor, not .item(): no host sync, and the same compiled graph for every chunk.
        count = (inp.labels != IGNORE_INDEX).sum().clamp_min(1).float()
        total = torch.zeros((), device=inp.h_s.device)
        for i in range(0, case.n, rows):
            h_c = inp.h_s[i : i + rows].detach().requires_grad_()
            loss_c = compiled(h_c, inp.w, inp.h_t[i : i + rows], inp.labels[i : i + rows], count)
            grads = torch.autograd.grad(loss_c, [h_c, *head])
            grad_h[i : i + rows] = grads[0]
            if grad_w is not None:
                grad_w += grads[1]
            total += loss_c.detach()
        inp.h_s.grad = grad_h
        if grad_w is not None:
            inp.w.grad = grad_w.to(inp.w.dtype)
        return total

    return step


# ----------------------------------------------------------------------------- Liger


def build_liger_fused_linear_jsd(inp: Inputs, case: Case) -> Step:
    from liger_kernel.transformers import LigerFusedLinearJSD

    loss_fn = LigerFusedLinearJSD(
        jsd_beta=case.beta, ignore_index=IGNORE_INDEX, temperature=case.temperature
    )

    def step() -> torch.Tensor:
        loss = loss_fn(inp.h_s, inp.w, inp.h_t, inp.w, inp.labels)
        loss.backward()
        return loss.detach()

    return step


def build_liger_chunked(inp: Inputs, case: Case) -> Step:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    # Soft loss only: the hard (cross-entropy) term is not part of the OPSD objective.
    loss_fn = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0,
        weight_soft_loss=1.0,
        beta=case.beta,
        ignore_index=IGNORE_INDEX,
        temperature=case.temperature,
    )

    def step() -> torch.Tensor:
        loss = loss_fn(inp.h_s, inp.w, inp.h_t, inp.w, inp.labels)
        loss.backward()
        return loss.detach()

    return step


# --------------------------------------------------------------------- the GEMM floor


def build_bare_gemms(inp: Inputs, case: Case) -> Step:
    """Only the matrix products a fused loss cannot avoid: both roles' logits, grad of the
    hidden and, for a trainable head, grad of the weight. The student logits stand in for
    d loss / d logits (same shape and dtype), so no elementwise work is timed at all."""

    def step() -> None:
        with torch.no_grad():
            z_s = inp.h_s @ inp.w.T
            z_t = inp.h_t @ inp.w.T
            inp.h_s.grad = z_s @ inp.w
            if inp.w.requires_grad:
                inp.w.grad = z_s.T @ inp.h_s
            del z_t
        return None

    return step


# ------------------------------------------------------------------------ opsd_kernels


def build_opsd(backend: str) -> Callable[[Inputs, Case], Step]:
    def build(inp: Inputs, case: Case) -> Step:
        # Imported late: the bench must load (and the other peers run) without the package.
        from opsd_kernels import fused_linear_divergence

        def step() -> torch.Tensor:
            loss = fused_linear_divergence(
                inp.h_s,
                inp.w,
                inp.h_t,
                labels=inp.labels,
                divergence="jsd",
                beta=case.beta,
                temperature=case.temperature,
                backend=backend,
            )
            loss.backward()
            return loss.detach()

        return step

    return build


# ---------------------------------------------------------------------------- registry


def _needs_cuda(case: Case, what: str) -> str | None:
    if case.device.type != "cuda":
        return (
            f"{what} runs Triton kernels, which need CUDA (TRITON_INTERPRET=1 would run "
            "them on CPU, but interpreted timings mean nothing)"
        )
    return None


def _opsd_skip(backend: str) -> Callable[[Case], str | None]:
    def skip(case: Case) -> str | None:
        try:
            from opsd_kernels import env_report, fused_linear_divergence  # noqa: F401
        except ImportError as e:
            return f"opsd_kernels.fused_linear_divergence is not importable: {e}"
        if backend == "triton" and case.device.type != "cuda":
            return _needs_cuda(case, "the opsd triton backend")
        # The package's own verdict, so the bench and the library never disagree on why.
        status = str(env_report().get(backend, ""))
        return f"opsd backend {backend!r} {status}" if status.startswith("unusable") else None

    return skip


@dataclass(frozen=True)
class Peer:
    name: str
    build: Callable[[Inputs, Case], Step]
    skip: Callable[[Case], str | None] = lambda case: None
    computes_loss: bool = True


PEERS: dict[str, Peer] = {
    p.name: p
    for p in [
        Peer("naive", build_naive),
        Peer("torch_compile_chunked", build_torch_compile_chunked),
        Peer(
            "liger_fused_linear_jsd",
            build_liger_fused_linear_jsd,
            lambda c: _needs_cuda(c, "Liger's LigerFusedLinearJSD"),
        ),
        # Liger's chunked loss is plain PyTorch + torch.compile, so it runs on CPU as well.
        Peer("liger_chunked", build_liger_chunked),
        Peer("bare_gemms", build_bare_gemms, computes_loss=False),
        Peer("opsd_torch", build_opsd("torch"), _opsd_skip("torch")),
        Peer("opsd_triton", build_opsd("triton"), _opsd_skip("triton")),
        Peer("opsd_native", build_opsd("native"), _opsd_skip("native")),
    ]
}
