"""Per-GPU peak memory of an OPSD training step, on paper, from model shapes.

    python bench/memory_on_paper.py [--gpus 8] [--completion 2048] [--prompt 512]
                                    [--rollouts 8] [--problems-per-gpu 1] [--out FILE.md]

For Qwen3-1.7B and Qwen3-8B at the OPSD reference configuration (8 GPUs, 2048-token
completions, n rollouts per problem, full-parameter training sharded ZeRO-3 / FSDP2 style), it
adds up what each way of computing the loss holds at its peak on one GPU. Everything but the
loss is the same for every method and is stated once:

- model states: bf16 parameters and gradients and fp32 Adam states (master weights, m, v),
  sharded over the GPUs: 16 bytes x parameters / GPUs;
- activations: gradient checkpointing at every decoder layer: each layer's bf16 input kept
  for the student ([tokens, hidden] x layers), plus one layer's recompute working set
  (q, k, v, attention output, the MLP's gate / up / act tensors and their gradients, bf16);
  the teacher forward runs without grad and keeps nothing between layers.

The loss's part (logits of both roles over the completion tokens, what the backward needs):

- naive (TRL's `generalized_jsd_loss` on full logits): both roles' bf16 logits [T, V]; fp32
  log p, log q, the mixture and the logits' gradient [T, V] each; the gathered bf16 head;
- Liger chunked (`LigerFusedLinearJSDLoss`): per 1024-row chunk, both roles' fp32 logits and
  about four more fp32 [chunk, V] tensors (softmaxes, mixture, gradient); the fp32 hidden
  gradient [T, H]; the gathered bf16 head and its fp32 gradient;
- opsd fused (this library, the head gathered by the engine): a 512 MiB fp32 workspace (both
  roles' chunk logits, the gradient written in place); the bf16 hidden gradient [T, H]; the
  gathered bf16 head and its fp32 gradient;
- opsd vocabulary-parallel (head rows split over the GPUs, never gathered): the same workspace
  over V / GPUs columns; the fp32 hidden gradient [T, H] (all-reduced); this GPU's head rows
  (bf16) and their fp32 gradient.

T counts the completion tokens of one GPU's micro-batch (rollouts x problems per GPU x
completion length). Peaks of different phases do not add up in reality (the loss runs after
the forward, the activations stay): this table adds the loss's peak to the activations kept
for the backward, which is the moment a step's peak usually falls on.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
WORKSPACE = 512 * 2**20  # the fused loss's default CUDA workspace (divergence driver)
LIGER_CHUNK = 1024


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def params(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * d * (self.heads + 2 * self.kv_heads) + self.heads * d * h + 2 * d
        mlp = 3 * h * self.intermediate
        layer = attn + mlp + 2 * h
        embed = self.vocab * h * (1 if self.tied else 2)
        return self.layers * layer + embed + h


QWEN3 = [
    Shape("Qwen3-1.7B", 2048, 28, 16, 8, 128, 6144, 151936, tied=True),
    Shape("Qwen3-8B", 4096, 36, 32, 8, 128, 12288, 151936, tied=False),
]


def model_states(m: Shape, gpus: int) -> float:
    return 16 * m.params / gpus


def activations(m: Shape, tokens: int) -> float:
    kept = m.layers * tokens * m.hidden * 2
    attn = tokens * m.head_dim * (m.heads * 2 + 2 * m.kv_heads) * 2
    mlp = tokens * m.intermediate * 3 * 2
    return kept + 2 * (attn + mlp + 2 * tokens * m.hidden * 2)  # forward + its gradients


def loss_memory(m: Shape, t: int, gpus: int) -> dict[str, float]:
    v, h = m.vocab, m.hidden
    head, head_grad = 2 * v * h, 4 * v * h
    return {
        "naive": 2 * 2 * t * v + 4 * 4 * t * v + head,
        "Liger chunked": 6 * 4 * LIGER_CHUNK * v + 4 * t * h + head + head_grad,
        "opsd fused": WORKSPACE + 2 * t * h + head + head_grad,
        "opsd vocab-parallel": WORKSPACE + 4 * t * h + (head + head_grad) / gpus,
    }


def table(gpus: int, prompt: int, completion: int, rollouts: int, problems: int) -> str:
    t = rollouts * problems * completion
    seq_tokens = rollouts * problems * (prompt + completion)
    lines = [
        f"Per-GPU peak, GiB: {gpus} GPUs, {rollouts} rollouts x {problems} problem(s) per GPU, "
        f"prompt {prompt} + completion {completion} tokens ({t} loss tokens, {seq_tokens} "
        "tokens through the model per GPU), full-parameter training, bf16.", "",
        "| model | params | model states | activations | loss: naive | Liger chunked | "
        "opsd fused | opsd vocab-parallel | total: naive | total: opsd vocab-parallel |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for m in QWEN3:
        states, acts = model_states(m, gpus), activations(m, seq_tokens)
        loss = loss_memory(m, t, gpus)
        cells = [f"{states / GIB:.1f}", f"{acts / GIB:.1f}",
                 *(f"{x / GIB:.1f}" for x in loss.values()),
                 f"{(states + acts + loss['naive']) / GIB:.1f}",
                 f"{(states + acts + loss['opsd vocab-parallel']) / GIB:.1f}"]
        lines.append(f"| {m.name} | {m.params / 1e9:.2f} B | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--completion", type=int, default=2048)
    ap.add_argument("--rollouts", type=int, default=8)
    ap.add_argument("--problems-per-gpu", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    for name in ("gpus", "completion", "rollouts", "problems_per_gpu"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: {getattr(args, name)}; expected >= 1")
    if args.prompt < 0:
        ap.error(f"--prompt: {args.prompt}; expected >= 0")
    text = table(args.gpus, args.prompt, args.completion, args.rollouts, args.problems_per_gpu)
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
