"""What the ingress sends a later tier: only the rows it sends, no padding, in the wire's format;
and how a tier batches token ids and hidden states (no cluster)."""

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import ray

from deployments.schemas import HiddenArrays, HiddenRef, HiddenWire, TierRequest, Tokens
from deployments.tier import TierRunner
from dimee_models.artifact import load_tokenizer
from dimee_models.tiers import Tier
from dimee_models.wire import pack, unpack
from tests.conftest import THREE_WAY_TEXTS


def arrays(lengths: list[int], width: int = 7, hidden: int = 3) -> HiddenArrays:
    mask = np.array([[1] * n + [0] * (width - n) for n in lengths])
    values = np.arange(len(lengths) * width * hidden, dtype=np.float32).reshape(len(lengths), width, hidden)
    return HiddenArrays(values, mask, layer=2)


def test_only_the_chosen_rows_are_sent_without_their_padding(runners):
    mobile, _ = runners
    state = arrays([7, 2, 4, 3])
    sent = mobile.store(state, [1, 3])
    assert isinstance(sent, HiddenWire) and sent.layer == 2 and sent.packed.lengths.tolist() == [2, 3]
    assert sent.packed.values.shape == (5, 3) and sent.nbytes == 5 * 3 * 4 + 2 * 4  # float32 values, int32 lengths
    hidden, mask = unpack(sent.packed)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    np.testing.assert_array_equal(hidden[mask.astype(bool)], state.hidden[[1, 3], :3][mask.astype(bool)])
    int8 = mobile.store(state, None, "int8").packed
    assert int8.scales.shape == (16,) and int8.values.dtype == np.uint8  # a scale per token; values deflated


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
        def packed(row: int):
            return pack(from_mobile.hidden.hidden[[row]], from_mobile.hidden.mask[[row]], "float32")

        def stored(row: int) -> HiddenRef:
            return HiddenRef(asyncio.sleep(0, result=packed(row)), from_mobile.hidden.layer, packed(row).nbytes)
        return [r for row, row_ids in enumerate(ids) for r in (
            TierRequest(Tokens([row_ids])), TierRequest(stored(row)),
            TierRequest(HiddenWire(packed(row), from_mobile.hidden.layer)))]

    alone = [asyncio.run(cloud.forward([r]))[0] for r in requests()]
    together = asyncio.run(cloud.forward(requests()))
    assert [r.received for r in together] == ["tokens", "object_store", "inline"] * len(ids)
    assert {r.batch_size for r in together} == {3 * len(ids)} and {r.exit_layer for r in together} == {6}
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
    for tokens, hidden, inline in zip(together[::3], together[1::3], together[2::3]):  # 1..6, 3..6 after 1..2
        np.testing.assert_allclose(tokens.probs, hidden.probs, atol=1e-4)
        np.testing.assert_array_equal(hidden.probs, inline.probs)


def test_onnx_runtime_answers_as_eager_torch_does(served_artifact, runners):
    """The same float32 weights on either runtime: a padded batch from token ids and one from hidden
    states give the same probabilities and hidden states."""
    mobile, cloud = runners
    eager = TierRunner(str(served_artifact), Tier.CLOUD, runtime="torch")
    assert cloud.describe()["runtime"] == "onnxruntime" and eager.onnx is None
    ids = load_tokenizer(served_artifact)(THREE_WAY_TEXTS + ["ok."])["input_ids"]
    [from_mobile] = asyncio.run(mobile.forward([TierRequest(Tokens(ids), keep_hidden=True)]))
    for given in (TierRequest(Tokens(ids), keep_hidden=True), TierRequest(mobile.store(from_mobile.hidden), True)):
        [a], [b] = (asyncio.run(runner.forward([given])) for runner in (cloud, eager))
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
        np.testing.assert_allclose(a.hidden.hidden, b.hidden.hidden, atol=1e-4)
        np.testing.assert_array_equal(a.hidden.mask, b.hidden.mask)
