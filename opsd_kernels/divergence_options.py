"""The divergence ops' options, each defined once: their names, types and defaults, the kind
codes every kernel shares, and the per-row options the row steps take.

`DivergenceOptions` is the one list of scalar options that every registered op takes after its
tensors. The op schemas (divergence_library.py) are written from it, losses.py packs it by name
and the ops read it by name: adding an option is one field here. `OpInputs` does the same for
each op's tensors and flags, so gradients are returned by input name, never by position.
"""

from __future__ import annotations

import collections
import typing
from dataclasses import dataclass
from typing import NamedTuple

# The kinds in the order of their integer codes in every kernel: the Triton constexprs
# (ops/divergence.py) and csrc/divergence_options.h's `Kind` (checked when _C loads).
KIND_NAMES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "sampled")
KIND_CODES: dict[str, int] = {name: code for code, name in enumerate(KIND_NAMES)}


@dataclass(frozen=True)
class TopK:
    k: int
    source: str
    tail_bucket: bool


@dataclass(frozen=True)
class RowOptions:
    """Scalar options of the per-row divergence step (csrc/divergence_options.h's RowOptions).

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


class DivergenceOptions(NamedTuple):
    """The scalar options of every divergence op, already checked and resolved by losses.py."""

    kind: str = "jsd"
    beta: float = 0.5
    temperature: float = 1.0
    teacher_temperature: float = 1.0
    top_k: int = 0  # 0: the full vocabulary
    top_k_source: str = "teacher"
    tail_bucket: bool = False
    clip: float | None = None
    softcap: float | None = None
    ignore_index: int = -100
    backend: str = "torch"  # resolved: never "auto" here
    chunk_size: int = 0  # 0: as many rows as fit the default workspace

    def row_options(self) -> RowOptions:
        return RowOptions.make(self.kind, self.beta, self.temperature, self.teacher_temperature,
                               self.clip, self.softcap, self.ignore_index)

    def top_k_support(self) -> TopK | None:
        return TopK(self.top_k, self.top_k_source, self.tail_bucket) if self.top_k > 0 else None


# Python type of an option -> its type in a torch.library schema.
_SCHEMA_TYPES = {str: "str", float: "float", int: "int", bool: "bool", float | None: "float?"}


def option_schema_types() -> dict[str, str]:
    """{option name: schema type}, in the order of DivergenceOptions."""
    hints = typing.get_type_hints(DivergenceOptions)
    return {name: _SCHEMA_TYPES[hints[name]] for name in DivergenceOptions._fields}


class OpInputs:
    """The inputs of one registered op, by name: its tensors ("Tensor" or "Tensor?"), every
    DivergenceOptions field, then its boolean flags.

    `schema` writes the op's schema; `parse` names the positional inputs an op receives (or
    `ctx.needs_input_grad`); `pack` orders keyword inputs for a call; `grads` places gradients
    at their inputs' positions (None everywhere else), as an autograd backward returns them.
    """

    def __init__(self, tensors: dict[str, str], flags: tuple[str, ...] = ()) -> None:
        self.tensors = dict(tensors)
        self.flags = tuple(flags)
        self.names = (*self.tensors, *DivergenceOptions._fields, *self.flags)
        self._args = collections.namedtuple("OpArgs", self.names)  # type: ignore[misc]

    def schema(self, returns: str) -> str:
        args = [f"{kind} {name}" for name, kind in self.tensors.items()]
        args += [f"{kind} {name}" for name, kind in option_schema_types().items()]
        args += [f"bool {name}" for name in self.flags]
        return f"({', '.join(args)}) -> {returns}"

    def parse(self, inputs: tuple) -> typing.Any:
        if len(inputs) != len(self.names):
            raise TypeError(f"expected {len(self.names)} inputs {self.names}, got {len(inputs)}")
        return self._args(*inputs)

    def options(self, inputs: tuple) -> DivergenceOptions:
        args = self.parse(inputs)
        return DivergenceOptions(*(getattr(args, name) for name in DivergenceOptions._fields))

    def pack(self, options: DivergenceOptions, **tensors_and_flags: typing.Any) -> tuple:
        values = {**tensors_and_flags, **options._asdict()}
        missing = [name for name in self.names if name not in values]
        unknown = [name for name in tensors_and_flags if name not in self.names]
        if missing or unknown:
            raise TypeError(f"inputs: missing {missing}, unknown {unknown}")
        return tuple(values[name] for name in self.names)

    def grads(self, **by_name: typing.Any) -> tuple:
        unknown = [name for name in by_name if name not in self.tensors]
        if unknown:
            raise TypeError(f"gradients for inputs that are not tensors of this op: {unknown}")
        return tuple(by_name.get(name) for name in self.names)
