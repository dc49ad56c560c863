"""What the ingress puts into the object store for a later tier: only the rows it sends, only the
padding they need; and how a tier batches token ids and hidden states (no cluster)."""

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import ray

from deployments.schemas import HiddenArrays, HiddenRef, TierRequest, Tokens
from deployments.tier import TierRunner, select_rows
from dimee_models.artifact import load_tokenizer
from dimee_models.tiers import Tier
from tests.conftest import THREE_WAY_TEXTS


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


@pytest.fixture
def runners(served_artifact, monkeypatch):
    """Mobile and cloud runners in this process: Ray is asked only for the node id."""
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "test-node"))
    return TierRunner(str(served_artifact), Tier.MOBILE), TierRunner(str(served_artifact), Tier.CLOUD)


def test_a_batch_of_tokens_and_hidden_states_answers_each_as_alone(served_artifact, runners):
    """Cloud gets token ids (cloud-only) and mobile's hidden states of texts of different lengths in
    one batch: one forward per starting layer, and every request gets what it gets alone."""
    mobile, cloud = runners
    ids = load_tokenizer(served_artifact)(THREE_WAY_TEXTS + ["ok."])["input_ids"]
    [from_mobile] = asyncio.run(mobile.forward([TierRequest(Tokens(ids), keep_hidden=True)]))
    assert from_mobile.hidden.layer == 2 and from_mobile.received == "tokens"

    def requests() -> list[TierRequest]:
        """Each text as tokens, then as mobile's hidden state in the object store (a coroutine stands
        in for it: each is awaited once, so every call builds new ones), then inline."""
        def stored(row: int) -> HiddenRef:
            hidden, mask = select_rows(from_mobile.hidden, [row])
            return HiddenRef(asyncio.sleep(0, result=(hidden, mask)), from_mobile.hidden.layer, hidden.nbytes)
        return [r for row, row_ids in enumerate(ids) for r in (
            TierRequest(Tokens([row_ids])), TierRequest(stored(row)),
            TierRequest(HiddenArrays(*select_rows(from_mobile.hidden, [row]), from_mobile.hidden.layer)))]

    alone = [asyncio.run(cloud.forward([r]))[0] for r in requests()]
    together = asyncio.run(cloud.forward(requests()))
    assert [r.received for r in together] == ["tokens", "object_store", "inline"] * len(ids)
    assert {r.batch_size for r in together} == {3 * len(ids)} and {r.exit_layer for r in together} == {6}
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
    for tokens, hidden, inline in zip(together[::3], together[1::3], together[2::3]):  # 1..6, 3..6 after 1..2
        np.testing.assert_allclose(tokens.probs, hidden.probs, atol=1e-4)
        np.testing.assert_array_equal(hidden.probs, inline.probs)
