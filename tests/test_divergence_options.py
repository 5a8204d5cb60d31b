"""The divergence ops' options (`opsd_kernels.divergence_options`): the kind codes cover the
public kinds, options normalise to what the row steps take, top-k is an option like the rest."""

from __future__ import annotations

import pytest

from opsd_kernels.divergence_options import (
    KIND_CODES,
    KIND_NAMES,
    DivergenceOptions,
    RowOptions,
    TopK,
)
from opsd_kernels.types import DIVERGENCES


def test_every_public_kind_has_one_code() -> None:
    assert set(KIND_NAMES) == set(DIVERGENCES) and len(KIND_NAMES) == len(DIVERGENCES)
    assert sorted(KIND_CODES.values()) == list(range(len(KIND_NAMES)))


@pytest.mark.parametrize("beta, kind", [(0.0, "forward_kl"), (1.0, "reverse_kl"), (0.3, "jsd")])
def test_jsd_endpoints_become_the_kl_kinds(beta: float, kind: str) -> None:
    """TRL's convention: beta 0 is forward KL, beta 1 reverse KL; the kernels never see them as
    JSD (whose formula tends to 0 at both ends)."""
    opts = DivergenceOptions(kind="jsd", beta=beta, temperature=0.5, teacher_temperature=2.0,
                             clip=0.1, softcap=4.0, ignore_index=-1).row_options()
    assert opts == RowOptions(kind, beta, 2.0, 0.5, 0.1, 4.0, -1)
    assert opts.unscaled() == RowOptions(kind, beta, 1.0, 1.0, 0.1, None, -1)


def test_top_k_support() -> None:
    assert DivergenceOptions().top_k_support() is None
    got = DivergenceOptions(top_k=5, top_k_source="student", tail_bucket=True).top_k_support()
    assert got == TopK(5, "student", True)
