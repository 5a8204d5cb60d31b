"""The options one row step needs, normalised once on the host."""

from __future__ import annotations

from dataclasses import dataclass

# Integer codes of the divergence kinds in every kernel (Triton constexprs, csrc/divergence.h).
KIND_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "sampled": 3}


@dataclass(frozen=True)
class RowOptions:
    """Scalar options of the per-row divergence step.

    `kind` is already normalised: "jsd" with beta 0 or 1 arrives as "forward_kl" or
    "reverse_kl" (TRL's endpoint convention), so the kernels never special-case beta.
    """

    kind: str
    beta: float
    inv_tau_s: float
    inv_tau_t: float
    clip: float | None
    softcap: float | None
    ignore_index: int

    @staticmethod
    def make(
        kind: str,
        beta: float,
        temperature: float,
        teacher_temperature: float,
        clip: float | None,
        softcap: float | None,
        ignore_index: int,
    ) -> RowOptions:
        if kind == "jsd" and beta == 0.0:
            kind = "forward_kl"
        elif kind == "jsd" and beta == 1.0:
            kind = "reverse_kl"
        return RowOptions(
            kind, beta, 1.0 / temperature, 1.0 / teacher_temperature, clip, softcap, ignore_index
        )

    def unscaled(self) -> RowOptions:
        """The same options on logits that are already soft-capped and temperature-scaled."""
        return RowOptions(self.kind, self.beta, 1.0, 1.0, self.clip, None, self.ignore_index)
