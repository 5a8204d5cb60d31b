"""Shared-prefix forward vs the plain batch on the same Hugging Face model: time, tokens and
incremental peak memory of the two OPSD roles.

    python -m pytest bench/bench_prefix.py -s --benchmark-json=.benchmarks/prefix.json

One group of n rollouts sharing a prompt of P tokens; each rollout has R tokens.
- student (forward + backward, all parameters trainable): plain = the batch of n sequences
  [prompt ; rollout], n (P + R) tokens; shared = `shared_prefix_forward`, P + n R tokens.
  Loss on the hidden states that predict the rollout tokens (the prompt's last one and the
  rollout's), so both compute the same numbers.
- teacher (forward under no_grad): the prompt is followed by S teacher-only tokens (the
  privileged solution). plain = n sequences [prompt ; solution ; rollout], n (P + S + R) tokens;
  shared = `prefix_forward` (P) + `extend_prefix` (S) + the rollouts (n R), everything
  recomputed in the timed step.
- teacher-reuse: the same teacher, but shared starts from the prompt's `PrefixState` that the
  student step already computed (same weights), as a trainer does: `extend_prefix` (S) + the
  rollouts (n R); the prompt state is made outside the timed step and outside the peak.
  plain is the same plain teacher batch as above.

Cases: CPU, a small Qwen3-shaped model in fp32 (4 layers, hidden 256; P = S = 256, R = 128,
n = 8); CUDA (skipped without one), a random-init Qwen3-1.7B-shaped model in bf16 with
P = S = R = 1024, n = 8. Every shared row records `speedup` and `peak_vs_plain` against the
plain row measured in the same run and the largest difference of their hidden states. The
ratios come from interleaved rounds (plain, shared, plain, shared, ...) run by the shared test
after its own timing, so that a change of machine load hits both sides alike; the table reports
the medians of those rounds. The last test prints the table with the targets (student >= 1.5x,
teacher >= 2x, lower peak; teacher-reuse has none). Knobs: OPSD_BENCH_SMOKE=1 (tiny model, one
round), OPSD_BENCH_ROUNDS (timed rounds, and interleaved pairs), OPSD_BENCH_DEVICE (only the
case of that device: `cpu` or `cuda`).
"""

from __future__ import annotations

import functools
import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

transformers = pytest.importorskip("transformers")

from opsd_kernels.prefix import extend_prefix, prefix_forward, shared_prefix_forward  # noqa: E402
from opsd_kernels.profiling import peak_bytes  # noqa: E402

SMOKE = os.environ.get("OPSD_BENCH_SMOKE") == "1"
TARGET_SPEEDUP: dict[str, float | None] = {"student": 1.5, "teacher": 2.0, "teacher-reuse": None}
ROLES = tuple(TARGET_SPEEDUP)


@dataclass(frozen=True)
class Case:
    name: str
    device: str
    dtype: torch.dtype
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    p: int  # shared prompt
    s: int  # teacher-only tokens
    r: int  # rollout
    n: int  # rollouts per prompt

    @property
    def label(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.name}-P{self.p}-S{self.s}-R{self.r}-n{self.n}-{dt}"

    def tokens(self, role: str, impl: str) -> int:
        head = self.p + (self.s if role != "student" else 0)
        if impl == "plain":
            return self.n * (head + self.r)
        return head - (self.p if role == "teacher-reuse" else 0) + self.n * self.r


def _cases() -> list[Case]:
    if SMOKE:
        return [Case("smoke", "cpu", torch.float32, 2, 64, 4, 2, 16, 128, 128, 16, 16, 8, 4)]
    cases = [
        Case("cpu-small", "cpu", torch.float32, 4, 256, 8, 4, 32, 768, 1024, 256, 256, 128, 8),
        Case("qwen3-1.7b", "cuda", torch.bfloat16, 28, 2048, 16, 8, 128, 6144, 151936,
             1024, 1024, 1024, 8),
    ]
    device = os.environ.get("OPSD_BENCH_DEVICE")
    return [c for c in cases if device is None or c.device == device]


def _rounds(case: Case) -> tuple[int, int]:
    if SMOKE:
        return 1, 0
    default = 10 if case.device == "cuda" else 5
    return int(os.environ.get("OPSD_BENCH_ROUNDS", default)), 2 if case.device == "cuda" else 0


@functools.lru_cache(maxsize=1)
def _model(case: Case) -> torch.nn.Module:
    config = transformers.Qwen3Config(
        vocab_size=case.vocab, hidden_size=case.hidden, intermediate_size=case.intermediate,
        num_hidden_layers=case.layers, num_attention_heads=case.heads,
        num_key_value_heads=case.kv_heads, head_dim=case.head_dim,
        max_position_embeddings=max(4096, case.p + case.s + case.r), rope_theta=1e6,
        tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(case.device):
        model = transformers.Qwen3ForCausalLM(config)
    return model.to(case.dtype).eval()


@dataclass
class Inputs:
    prompt: torch.Tensor  # [1, P]
    solution: torch.Tensor  # [1, S]
    rollouts: torch.Tensor  # [n, R]
    group_index: torch.Tensor  # [n] zeros


@functools.lru_cache(maxsize=1)
def _inputs(case: Case) -> Inputs:
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, case.vocab, shape, generator=g).to(case.device)
           for shape in ((1, case.p), (1, case.s), (case.n, case.r))]
    return Inputs(*ids, torch.zeros(case.n, dtype=torch.int64, device=case.device))


def _sync(case: Case) -> None:
    if case.device == "cuda":
        torch.cuda.synchronize()


def _loss(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.float().square().mean()


def _build(case: Case, role: str, impl: str) -> Callable[[], torch.Tensor]:
    """A step returning the hidden states that predict the rollout tokens, [n, R, H]."""
    model, inp = _model(case), _inputs(case)
    decoder = model.get_decoder()
    n = case.n
    head = inp.prompt if role == "student" else torch.cat([inp.prompt, inp.solution], dim=1)
    prompt_state = None
    if role == "teacher-reuse" and impl == "shared":
        with torch.no_grad():  # what the student step computed, on the same weights
            prompt_state = prefix_forward(model, inp.prompt)

    def plain() -> torch.Tensor:
        ids = torch.cat([head.expand(n, -1), inp.rollouts], dim=1)
        hidden = decoder(ids, use_cache=False).last_hidden_state
        return hidden[:, head.shape[1] - 1:-1]

    def shared() -> torch.Tensor:
        if role == "student":
            out = shared_prefix_forward(model, inp.prompt, inp.rollouts, inp.group_index)
        else:
            base = prompt_state if prompt_state is not None else prefix_forward(model, inp.prompt)
            state = extend_prefix(model, base, inp.solution)
            out = shared_prefix_forward(model, state, inp.rollouts, inp.group_index)
        last = out.prefix_last_hidden[inp.group_index][:, None]
        return torch.cat([last, out.hidden_states[:, :-1]], dim=1)

    forward = plain if impl == "plain" else shared

    def step() -> torch.Tensor:
        if role != "student":
            with torch.no_grad():
                return forward()
        model.zero_grad(set_to_none=True)
        hidden = forward()
        _loss(hidden).backward()
        return hidden.detach()

    return step


# (case label, role, impl) -> (median seconds, peak bytes, tokens); the times of a role are
# replaced by the medians of its interleaved rounds once the shared row has run.
_RESULTS: dict[tuple[str, str, str], tuple[float, int | None, int]] = {}
_PLAIN_HIDDEN: dict[tuple[str, str], torch.Tensor] = {}
_LOAD: dict[tuple[str, str], float] = {}  # 1-minute load average after the interleaved rounds

PARAMS = [pytest.param(case, role, impl, id=f"{role}-{impl}-{case.label}")
          for case in _cases() for role in ROLES for impl in ("plain", "shared")]


def _interleaved(case: Case, steps: dict[str, Callable[[], torch.Tensor]],
                 rounds: int) -> dict[str, float]:
    """Median seconds of each step over `rounds` rounds that run the steps in turn."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            _sync(case)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@pytest.mark.parametrize(("case", "role", "impl"), PARAMS)
def test_prefix(benchmark, case: Case, role: str, impl: str) -> None:
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    step = _build(case, role, impl)
    step()  # warm-up: Triton compilation, lazy initialisation
    _sync(case)
    device = torch.device(case.device)
    try:
        peak, hidden = peak_bytes(step, device)
    except torch.OutOfMemoryError as e:
        pytest.skip(f"{role}/{impl} ran out of memory: {str(e).splitlines()[0]}")
    if impl == "plain":
        _PLAIN_HIDDEN[(case.label, role)] = hidden.float()
    reference = _PLAIN_HIDDEN.get((case.label, role))

    def timed() -> torch.Tensor:
        out = step()
        _sync(case)
        return out

    rounds, warmup = _rounds(case)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    median = benchmark.stats.stats.median
    tokens = case.tokens(role, impl)
    _RESULTS[(case.label, role, impl)] = (median, peak, tokens)
    info = dict(case=case.label, role=role, impl=impl, tokens=tokens, peak_bytes=peak,
                device=case.device, device_name=torch.cuda.get_device_name()
                if case.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
                load_avg_1min=os.getloadavg()[0], torch=torch.__version__,
                transformers=transformers.__version__, smoke=SMOKE)
    plain = _RESULTS.get((case.label, role, "plain"))
    if impl == "shared" and plain is not None:
        paired = _interleaved(case, {"plain": _build(case, role, "plain"), "shared": step},
                              rounds)
        _RESULTS[(case.label, role, "plain")] = (paired["plain"], *plain[1:])
        _RESULTS[(case.label, role, "shared")] = (paired["shared"], peak, tokens)
        _LOAD[(case.label, role)] = os.getloadavg()[0]
        info["interleaved_plain_s"] = paired["plain"]
        info["interleaved_shared_s"] = paired["shared"]
        info["speedup"] = paired["plain"] / paired["shared"]
        info["speedup_separate_rounds"] = plain[0] / median
        if peak and plain[1]:
            info["peak_vs_plain"] = peak / plain[1]
    if impl == "shared" and reference is not None:
        err = (hidden.float() - reference).abs().max() / reference.abs().max()
        info["hidden_rel_err_vs_plain"] = err.item()
        # Same math, or the timing compares nothing (bf16: two roundings of deep sums).
        assert info["hidden_rel_err_vs_plain"] < (1e-3 if case.dtype == torch.float32 else 0.1)
    benchmark.extra_info.update(info)
    del hidden
    gc.collect()
    if case.device == "cuda":
        torch.cuda.empty_cache()


def test_print_summary() -> None:
    """The ratio table of this run, with the targets (pytest -s shows it)."""
    if not _RESULTS:
        pytest.skip("nothing ran")
    mib = lambda b: f"{b / 2**20:.0f}" if b is not None else "-"  # noqa: E731
    lines = [f"{'case':<38} {'role':<13} {'plain ms':>9} {'shared ms':>9} {'speed-up':>8} "
             f"{'tokens plain/shared':>19} {'peak MiB plain/shared':>21} {'load':>5}  target"]
    for (label, role, impl), (t_shared, p_shared, n_shared) in _RESULTS.items():
        if impl != "shared" or (label, role, "plain") not in _RESULTS:
            continue
        t_plain, p_plain, n_plain = _RESULTS[(label, role, "plain")]
        speedup = t_plain / t_shared
        lower_peak = p_plain is not None and p_shared is not None and p_shared < p_plain
        target = TARGET_SPEEDUP[role]
        if target is None:
            verdict = "- (reuses the student's prompt K/V; lower peak: " + \
                      f"{'yes' if lower_peak else 'no'})"
        else:
            ok = speedup >= target and lower_peak
            verdict = f"{'PASS' if ok else 'FAIL'} (>= {target}x, lower peak)"
        lines.append(f"{label:<38} {role:<13} {t_plain * 1e3:>9.1f} {t_shared * 1e3:>9.1f} "
                     f"{speedup:>7.2f}x {f'{n_plain}/{n_shared}':>19} "
                     f"{f'{mib(p_plain)}/{mib(p_shared)}':>21} "
                     f"{_LOAD.get((label, role), float('nan')):>5.1f}  {verdict}")
    print("\n" + "\n".join(lines))
