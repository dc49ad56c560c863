"""What the ingress puts into the object store for a later tier: only the rows it sends, only the
padding they need (no cluster)."""

import numpy as np

from deployments.schemas import HiddenArrays
from deployments.tier import select_rows


def arrays(lengths: list[int], width: int = 7, hidden: int = 3) -> HiddenArrays:
    mask = np.array([[1] * n + [0] * (width - n) for n in lengths])
    values = np.arange(len(lengths) * width * hidden, dtype=np.float32).reshape(len(lengths), width, hidden)
    return HiddenArrays(values, mask, layer=2)


def test_only_the_chosen_rows_and_their_padding_are_stored():
    state = arrays([7, 2, 4, 3])
    hidden, mask = select_rows(state, [1, 3])
    assert hidden.shape == (2, 3, 3) and mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    np.testing.assert_array_equal(hidden, state.hidden[[1, 3], :3])
    assert hidden.flags.c_contiguous  # what ray.put serializes, not a view of the whole batch


def test_all_rows_trimmed_to_the_longest():
    state = arrays([5, 2])
    hidden, mask = select_rows(state, None)
    assert hidden.shape == (2, 5, 3) and mask.shape == (2, 5)
    np.testing.assert_array_equal(hidden, state.hidden[:, :5])
