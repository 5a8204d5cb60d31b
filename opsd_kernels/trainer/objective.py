"""The training objective of one micro-batch, as an nn.Module so accelerate's DDP wrapper (or
the FSDP2 root unit) covers it whole. Per method:

- opsd: the student's and the teacher's final hidden states at the response tokens, then the
  fused divergence on the shared lm_head (plus, with ``sft_loss_weight``, that weight times the
  cross-entropy of the reference solutions under the student prompt);
- sft: cross-entropy of the reference solutions;
- grpo: the policy-gradient loss of GRPO (TRL's "dapo" form, one update per rollout batch):
  -A exp(log p - sg(log p)) per response token, A the response's group-normalised reward.

Log-probabilities come from `fused_linear_logprobs`, so no method forms [tokens x vocab] logits.
Hidden state j of a role predicts response token j, so it sits one position before it: the
prompt's last token for j = 0, response token j - 1 after that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opsd_kernels import sharding
from opsd_kernels._peft import causal_lm
from opsd_kernels.logprobs import fused_linear_logprobs
from opsd_kernels.losses import fused_linear_divergence
from opsd_kernels.prefix import (
    PrefixState,
    extend_prefix,
    prefix_forward,
    shared_prefix_forward,
)
from opsd_kernels.trainer.config import OPSDConfig
from opsd_kernels.trainer.prompts import EncodedProblem
from opsd_kernels.trainer.teacher import Teacher

IGNORE = -100


@dataclass
class RolloutBatch:
    problems: list[EncodedProblem]  # G
    responses: list[list[int]]  # B, each non-empty
    group_index: list[int]  # B, in [0, G): the problem of each response
    advantages: list[float] | None = None  # B, grpo: each response's advantage
    rewards: list[float] | None = None  # B: 1 for a correct final answer, else 0

    @property
    def num_tokens(self) -> int:
        return sum(len(r) for r in self.responses)


def pad_rows(rows: list[list[int]], pad: int, device: torch.device,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [N, max len] ids and their [N] int64 lengths."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    ids = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return ids.to(device), lengths.to(device)


def sum_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """sum of -log p(label) over the labelled tokens (fused: no [tokens x vocab] logits)."""
    return -fused_linear_logprobs(hidden, weight, labels, ignore_index=IGNORE).sum()


class DistillationObjective(nn.Module):
    def __init__(self, model: nn.Module, teacher: Teacher, config: OPSDConfig,
                 pad_token_id: int) -> None:
        super().__init__()
        self.model = model
        self.teacher = teacher
        self.config = config
        self.pad_token_id = pad_token_id

    # accelerate's FSDP2 preparation reads these from the module it shards (this one): each
    # decoder layer becomes its own unit, and so do the input embeddings and the lm_head, which
    # is then gathered only around the loss (sharding.full_weight).
    @property
    def _no_split_modules(self) -> list[str] | None:
        return getattr(causal_lm(self.model), "_no_split_modules", None)

    def get_input_embeddings(self) -> nn.Module:
        return causal_lm(self.model).get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return causal_lm(self.model).get_output_embeddings()

    def forward(self, batch: RolloutBatch, num_items: torch.Tensor,
                targets: RolloutBatch | None = None, num_target_items: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's loss (its tokens' share of sum / num_items) and metric sums.
        ``targets`` (the reference solutions, with their global token count
        ``num_target_items``) add ``sft_loss_weight`` x their cross-entropy to opsd's loss."""
        lm = causal_lm(self.model)
        lm_head = lm.get_output_embeddings()
        device = lm_head.weight.device
        responses, lengths = pad_rows(batch.responses, self.pad_token_id, device)
        group_index = torch.tensor(batch.group_index, dtype=torch.int64, device=device)
        steps = torch.arange(responses.shape[1], device=device)
        labels = responses.masked_fill(steps[None, :] >= lengths[:, None], IGNORE)
        students = [p.student for p in batch.problems]
        rows = (batch, responses, lengths, group_index)
        tokens = (labels != IGNORE).sum()
        if self.config.method == "sft":
            hidden = self._hidden(lm, students, *rows)
            with sharding.full_weight(self, lm_head) as weight:
                return sum_cross_entropy(hidden, weight, labels) / num_items, {"tokens": tokens}
        if self.config.method == "grpo":
            return self._policy_gradient(lm, lm_head, students, rows, labels, num_items)

        head = self._shared_head(lm, batch.problems, device)
        teachers = [p.teacher for p in batch.problems]
        with torch.no_grad(), self.teacher.weights():
            teacher_hidden = self._hidden(lm, teachers, *rows, head=head)
            teacher_weight = self._teacher_head(lm_head)
        student_hidden = self._hidden(lm, students, *rows, head=head)
        c = self.config
        with sharding.full_weight(self, lm_head) as weight:
            loss, stats = fused_linear_divergence(
                student_hidden, weight, teacher_hidden, teacher_weight=teacher_weight,
                labels=labels, divergence=c.divergence, beta=c.beta,
                temperature=c.loss_temperature, top_k=c.loss_top_k, clip=c.clip,
                num_items=num_items, return_stats=True)
        sums = {
            "tokens": tokens,
            "divergence": stats.divergence.sum().detach(),
            "student_entropy": stats.student_entropy.sum().detach(),
            "teacher_entropy": stats.teacher_entropy.sum().detach(),
        }
        if targets is not None:
            sft = self._target_cross_entropy(lm, lm_head, targets) / num_target_items
            loss = loss + c.sft_loss_weight * sft
            sums["sft_loss"] = sft.detach()
        return loss, sums

    def _policy_gradient(self, lm: nn.Module, lm_head: nn.Module, students: list[list[int]],
                         rows: tuple, labels: torch.Tensor, num_items: torch.Tensor,
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """GRPO with one update per rollout batch: the ratio exp(log p - sg(log p)) is 1 in
        value and carries the gradient of log p; scored at the rollout temperature, as sampled
        (TRL's convention)."""
        batch = rows[0]
        if batch.advantages is None:
            raise ValueError("method grpo: the rollout batch has no advantages")
        hidden = self._hidden(lm, students, *rows)
        with sharding.full_weight(self, lm_head) as weight:
            logp = fused_linear_logprobs(hidden, weight, labels, ignore_index=IGNORE,
                                         temperature=self.config.rollout_temperature)
        advantages = torch.tensor(batch.advantages, dtype=torch.float32, device=logp.device)
        ratio = torch.exp(logp - logp.detach())
        per_token = -advantages[:, None] * ratio
        loss = per_token.masked_fill(labels == IGNORE, 0.0).sum() / num_items
        tokens = (labels != IGNORE).sum()
        return loss, {"tokens": tokens, "logprob": logp.sum().detach()}

    def _target_cross_entropy(self, lm: nn.Module, lm_head: nn.Module,
                              targets: RolloutBatch) -> torch.Tensor:
        """Summed cross-entropy of the reference solutions under the student prompts."""
        device = lm_head.weight.device
        responses, lengths = pad_rows(targets.responses, self.pad_token_id, device)
        group_index = torch.tensor(targets.group_index, dtype=torch.int64, device=device)
        steps = torch.arange(responses.shape[1], device=device)
        labels = responses.masked_fill(steps[None, :] >= lengths[:, None], IGNORE)
        hidden = self._hidden(lm, [p.student for p in targets.problems], targets, responses,
                              lengths, group_index)
        with sharding.full_weight(self, lm_head) as weight:
            return sum_cross_entropy(hidden, weight, labels)

    def _teacher_head(self, lm_head: nn.Module) -> torch.Tensor | None:
        """A copy of the lm_head weight as the teacher sees it (inside its weights block), when
        it differs from the student's; None when both share it."""
        if not self.teacher.changes(lm_head.weight):
            return None
        with sharding.full_weight(self, lm_head) as weight:
            return weight.detach().clone()

    def _shared_head(self, lm: nn.Module, problems: list[EncodedProblem],
                     device: torch.device) -> tuple[PrefixState, list[int]] | None:
        """The student's pass over the prompts' common head (with grad) and the head lengths,
        when the teacher may read it: same weights, shared prefixes on, every problem has a
        head."""
        if not (self.config.shared_prefix and self.teacher.shares_weights):
            return None
        heads = [p.head_length for p in problems]
        if min(heads) == 0:
            return None
        ids, lengths = pad_rows([p.student[:h] for p, h in zip(problems, heads, strict=True)],
                                self.pad_token_id, device)
        return prefix_forward(lm, ids, lengths), heads

    def _hidden(self, lm: nn.Module, prompts: list[list[int]], batch: RolloutBatch,
                responses: torch.Tensor, lengths: torch.Tensor, group_index: torch.Tensor,
                head: tuple[PrefixState, list[int]] | None = None) -> torch.Tensor:
        """[B, R, H] final hidden states predicting each response token, under ``prompts``.
        Token ids are read from ``batch`` (host lists), never back from the device."""
        device = responses.device
        if self.config.shared_prefix:
            if head is not None:  # the teacher reads it detached; the student backpropagates
                state, cut = head
                tails, tail_lengths = pad_rows([p[h:] for p, h in zip(prompts, cut, strict=True)],
                                               self.pad_token_id, device)
                state = extend_prefix(lm, state, tails, tail_lengths,
                                      detach_base=not torch.is_grad_enabled())
            else:
                state = prefix_forward(lm, *pad_rows(prompts, self.pad_token_id, device))
            out = shared_prefix_forward(lm, state, responses, group_index,
                                        suffix_lengths=lengths)
            first = state.last_hidden.index_select(0, group_index)[:, None]
            return torch.cat([first, out.hidden_states[:, :-1]], dim=1)
        ids, seq_lengths = pad_rows([prompts[g] + r for g, r in zip(
            batch.group_index, batch.responses, strict=True)], self.pad_token_id, device)
        mask = torch.arange(ids.shape[1], device=device)[None, :] < seq_lengths[:, None]
        hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask.long(),
                                  use_cache=False).last_hidden_state
        prompt_lengths = seq_lengths - lengths
        where = prompt_lengths[:, None] - 1 + torch.arange(responses.shape[1], device=device)
        where = where.clamp_max(ids.shape[1] - 1)  # padded steps: any real row, masked later
        return hidden.gather(1, where[:, :, None].expand(-1, -1, hidden.shape[-1]))
