"""The Triton row step's launcher (`opsd_kernels.ops.divergence`) on what the row-step suite of
test_divergence.py does not reach: input a GPU build would read out of bounds."""

from __future__ import annotations

import pytest
import torch
from conftest import generator, randn, requires_triton

from opsd_kernels.divergence_options import RowOptions
from opsd_kernels.types import NUM_STATS

# The interpreter evaluates exp on lanes that tl.where then discards.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

ROWS, VOCAB = 3, 37


def _run(kind: str, labels: torch.Tensor, around: float, seed: int) -> torch.Tensor:
    """The launcher on [ROWS, VOCAB] blocks that sit inside buffers filled with `around`
    (one element before the block, one after); returns the stats and the gradient."""
    from opsd_kernels.ops.divergence import divergence_rows_triton_

    gen = generator(seed)
    blocks = []
    for _ in range(2):
        buffer = torch.full((ROWS * VOCAB + 2,), around)
        block = buffer[1:-1].view(ROWS, VOCAB)
        block.copy_(randn(gen, ROWS, VOCAB, scale=2.0))
        blocks.append(block)
    s, t = blocks
    stats = torch.full((ROWS, NUM_STATS), float("nan"))
    opts = RowOptions.make(kind, 0.5, 1.0, 1.0, None, None, -100)
    divergence_rows_triton_(s, t, labels, torch.ones(ROWS), stats, opts, write_grad=True)
    return torch.cat([stats, s], dim=1)


@requires_triton
@pytest.mark.parametrize("kind", ["sampled", "jsd"])
def test_labels_out_of_range_read_nothing_outside_their_row(seed: int, kind: str) -> None:
    """Labels outside [0, V) that are not ignore_index are refused on the host, but not while
    torch.compile traces; the kernel then must not read outside the row (a negative label on
    row 0 once read the element before the buffer, which could fault on a GPU). Whatever it
    computes for such a row, it cannot depend on memory the row does not own."""
    labels = torch.tensor([-1, VOCAB, 5])
    first = _run(kind, labels, 0.0, seed)
    second = _run(kind, labels, 1.0e4, seed)
    torch.testing.assert_close(first, second, rtol=0, atol=0, equal_nan=True)
    # The row with a valid label is untouched by its neighbours' bad ones.
    valid = _run(kind, torch.tensor([-100, -100, 5]), 0.0, seed)
    torch.testing.assert_close(first[2], valid[2], rtol=0, atol=0)
