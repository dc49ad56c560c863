"""What crosses a link (dimee_models/wire.py): the formats, their bytes and rounding, the cost model
of a wire, and calibration certifying on the outputs served over it (no cluster)."""

import shutil

import numpy as np
import pytest

from dimee_models.calibration import choose_wire, wire_cost, write_calibration
from dimee_models.cost import PATHS, CostModel
from dimee_models.evaluate import predict_texts
from dimee_models.outputs import OutputSource
from dimee_models.profile import LINK_PRESETS, wire_savings
from dimee_models.wire import Wire, bytes_per_token, pack, round_trip, unpack
from tests.conftest import THREE_WAY_TEXTS


def batch(lengths: list[int], width: int = 9, hidden: int = 384, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    mask = np.array([[1] * n + [0] * (width - n) for n in lengths])
    values = np.random.default_rng(seed).normal(0, 3, (len(lengths), width, hidden)).astype(np.float32)
    return values, mask


def test_float32_drops_the_padding_and_nothing_else():
    hidden, mask = batch([9, 2, 5])
    packed = pack(hidden, mask, "float32")
    assert packed.values.shape == (16, 384) and packed.lengths.tolist() == [9, 2, 5] and packed.scales is None
    back, back_mask = unpack(packed)
    np.testing.assert_array_equal(back_mask, mask)
    np.testing.assert_array_equal(back[mask.astype(bool)], hidden[mask.astype(bool)])
    assert not back[~mask.astype(bool)].any()  # padding comes back as zeros


def test_int8_keeps_each_token_within_half_a_step_in_a_quarter_of_the_bytes():
    hidden, mask = batch([9, 3])
    hidden[1, 0] = 0  # a token of zeros
    packed = pack(hidden, mask, "int8")
    assert packed.values.dtype == np.uint8 and packed.scales.dtype == np.float16
    back, _ = unpack(packed)
    real = mask.astype(bool)
    step = packed.scales.astype(np.float32)[:, None]
    assert (np.abs(back[real] - hidden[real]) <= step / 2 + 1e-6).all()
    assert not back[1, 0].any()
    assert bytes_per_token("int8", 384) / bytes_per_token("float32", 384) == pytest.approx(386 / 1536)
    # at most a byte a value and the scales per token, a length per row, and deflate's header
    assert packed.nbytes <= 12 * 386 + 2 * 4 + 16
    fp16, _ = unpack(pack(hidden, mask, "float16"))
    np.testing.assert_allclose(fp16[real], hidden[real], rtol=1e-3, atol=1e-3)


def test_int8_values_near_zero_are_sent_in_fewer_bits():
    # a transformer's hidden state: most values small against a few large dimensions that set the scale
    hidden, mask = batch([9, 5])
    hidden /= 10
    hidden[..., :3] = 20
    packed = pack(hidden, mask, "int8")
    assert packed.nbytes < 0.7 * 14 * bytes_per_token("int8", 384)
    back, _ = unpack(packed)
    real = mask.astype(bool)
    assert (np.abs(back[real] - hidden[real]) <= packed.scales.astype(np.float32)[:, None] / 2 + 1e-6).all()


def test_offline_rounding_is_what_the_next_tier_is_sent():
    hidden, mask = batch([4, 9, 1])
    for fmt in ("float16", "int8"):
        rounded = round_trip(hidden, mask, fmt)
        sent, _ = unpack(pack(hidden, mask, fmt))
        assert rounded.shape == hidden.shape
        np.testing.assert_array_equal(rounded[:, :sent.shape[1]], sent)
    assert round_trip(hidden, mask, "float32") is hidden


def test_a_wire_costs_what_its_bytes_and_carrier_cost():
    cost = CostModel(unit="ms", lambda_mobile=5, lambda_edge=5, lambda_cloud=2, o_1=10, o_2=30, o_edge_cloud=40,
                     o_cloud_only=25, fixed=10)
    savings = {"float32": {"o_1": 0, "o_2": 0, "o_edge_cloud": 0}, "int8": {"o_1": 6, "o_2": 7, "o_edge_cloud": 13}}
    int8 = wire_cost(cost, savings, Wire(format="int8"), 3)
    assert (int8.o_1, int8.o_2, int8.o_edge_cloud) == (4, 23, 27)
    tokens = wire_cost(cost, savings, Wire(carrier="tokens"), 3)
    # cloud from token ids: cloud-only's hop, then every layer on cloud
    assert tokens.path_costs(3, 5, 6)["cloud"] == cost.path_costs(3, 5, 6)["mobile"] + 25 + 2 * 6
    assert wire_cost(cost, None, Wire(format="int8"), 3) == cost  # no links known: bytes cost nothing


def test_savings_are_the_bytes_not_sent_over_each_link(served_artifact):
    from dimee_models.profile import Profile, Stat, TierCompute

    stat = Stat(n=1, mean_ms=1, p50_ms=1, p99_ms=1)
    compute = TierCompute(layers=1, one_text=stat, batch=1, batch_per_text_ms=1)
    profile = Profile(created="now", artifact="a", model="m", exits={"mobile": 2, "edge": 4, "cloud": 6}, nodes=[],
                      texts=1, fixed=stat, compute={t: compute for t in ("mobile", "edge", "cloud")},
                      hops={h: stat for h in ("noop", "ingress_edge", "ingress_cloud", "ingress_cloud_tokens",
                                              "edge_cloud")}, hidden_bytes_per_token=1536, tokens_per_text=25)
    assert wire_savings(profile) is None
    saved = wire_savings(profile, LINK_PRESETS["mobile"])
    int8_bytes = 25 * (1536 - 386)
    assert saved["int8"]["o_1"] == pytest.approx(int8_bytes * 8 / 10_000)  # 10 Mbit/s
    assert saved["int8"]["o_edge_cloud"] == pytest.approx(2 * int8_bytes * 8 / 10_000)
    assert saved["float32"]["o_2"] == 0
    measured = profile.model_copy(update={"wire_bytes_per_token": {"float32": 1536, "float16": 768, "int8": 200}})
    assert wire_savings(measured, LINK_PRESETS["mobile"])["int8"]["o_1"] == pytest.approx(25 * 1336 * 8 / 10_000)


@pytest.fixture
def wired(served_artifact, tmp_path):
    return shutil.copytree(served_artifact, tmp_path / "wired")


def test_calibration_certifies_on_what_the_wire_serves(wired, served_artifact):
    """Forced int8 with token ids to cloud: the guarantee is computed on the outputs served over it,
    losses counted against the float32 final exit, and offline prediction answers over the same wire."""
    doc = write_calibration(wired, CostModel(), 0.3, wire=Wire(format="int8", carrier="tokens"))
    assert doc.wire == Wire(format="int8", carrier="tokens") and doc.wire_choice is None
    out = OutputSource(wired).wire_split("calibration", 2, 4, doc.wire)
    assert out.wire == doc.wire and (wired / "outputs" / "calibration-int8-2-4.safetensors").is_file()
    float32 = OutputSource(wired).split("calibration")
    np.testing.assert_array_equal(out.logits[:, :2], float32.logits[:, :2])  # mobile computes as before
    assert not np.array_equal(out.logits[:, 3], float32.logits[:, 3])  # edge's exit from the int8 state
    np.testing.assert_array_equal(out.answers(np.full(len(out.labels), PATHS.index("cloud"))), float32.reference)
    np.testing.assert_array_equal(out.reference, float32.reference)
    rounded, exact = (predict_texts(a, THREE_WAY_TEXTS, "edge_only") for a in (wired, served_artifact))
    gaps = [abs(r["confidence"] - e["confidence"]) for r, e in zip(rounded, exact)]
    assert 0 < max(gaps) < 0.05


def test_a_wire_is_chosen_only_where_its_bytes_save_something(wired):
    source, cost = OutputSource(wired), CostModel()
    free = {fmt: {"o_1": 0.0, "o_2": 0.0, "o_edge_cloud": 0.0} for fmt in ("float32", "float16", "int8")}
    wire, found = choose_wire(source, 2, 4, cost, free, 0.3)
    assert wire == Wire() and len(found) == 6  # every format and carrier scored; a tie keeps float32
    dear = {fmt: {"o_1": s, "o_2": s, "o_edge_cloud": 2 * s} for fmt, s in (("float32", 0.0), ("float16", 0.1),
                                                                             ("int8", 0.15))}
    wire, found = choose_wire(source, 2, 4, cost, dear, 0.3)
    costs = {(f["format"], f["carrier"]): f["cost"] for f in found}
    assert costs[wire.format, wire.carrier] == min(costs.values()) < costs["float32", "hidden"]


def test_an_int8_mobile_slice_is_certified_on_what_it_computes(wired, served_artifact):
    """`--mobile-slice int8`: the mobile exit, z and every answer after them come from the int8 slice
    (dimee_models/onnx_layers.py), certified against the float32 model's final exit."""
    doc = write_calibration(wired, CostModel(), 0.3, mobile_slice="int8")
    assert doc.wire == Wire(mobile_slice="int8")
    out = OutputSource(wired).wire_split("calibration", 2, 4, doc.wire)
    assert (wired / "outputs" / "calibration-float32-2-4-int8-mobile.safetensors").is_file()
    float32 = OutputSource(wired).split("calibration")
    np.testing.assert_array_equal(out.logits[:, 0], float32.logits[:, 0])  # an exit the slice does not serve
    assert not np.array_equal(out.logits[:, 1], float32.logits[:, 1]) and not np.array_equal(out.z, float32.z)
    assert (out.logits[:, 1].argmax(-1) == float32.logits[:, 1].argmax(-1)).mean() > 0.95
    np.testing.assert_array_equal(out.reference, float32.reference)
    rounded, exact = (predict_texts(a, THREE_WAY_TEXTS, "mobile_only") for a in (wired, served_artifact))
    assert 0 < max(abs(r["confidence"] - e["confidence"]) for r, e in zip(rounded, exact)) < 0.05
