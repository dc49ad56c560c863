"""MultiExitEncoder on tiny random configs: slices, tier modules, per-sample exits."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, BertConfig, DistilBertConfig, GPT2Config, MPNetConfig, RobertaConfig

from dimee_models.model import MultiExitEncoder
from dimee_models.train import resolve_backbone

ATOL = 1e-5
TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, vocab_size=99,
            max_position_embeddings=64)
CONFIGS = {
    "bert": lambda: BertConfig(**TINY),
    "roberta": lambda: RobertaConfig(**TINY),
    "mpnet": lambda: MPNetConfig(**TINY),
    "distilbert": lambda: DistilBertConfig(dim=32, n_layers=4, n_heads=4, hidden_dim=37, vocab_size=99,
                                           max_position_embeddings=64),
}
# mobile exits after layer 1, edge after layer 3, cloud after layer 4 (of 4)
M, E, L = 1, 3, 4


def tiny_model(family: str, num_labels: int = 3) -> tuple[MultiExitEncoder, torch.nn.Module]:
    torch.manual_seed(0)
    backbone = AutoModel.from_config(CONFIGS[family]()).eval()
    return MultiExitEncoder.from_backbone(backbone, num_labels=num_labels).eval(), backbone


def padded_batch(batch: int = 3, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids avoid the low special/padding ids, so position ids do not depend on them."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 99, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return ids, mask


def chain(modules, ids, mask, exits):
    """Run `exits` (1-based layers) in order, each on the module at the same position; the state
    travels between modules as a replica would receive it."""
    state = modules[0].embed(ids, mask)
    outs = []
    for module, layer in zip(modules, exits):
        state = module.run_layers(state, layer)
        outs.append(module.exit(state))
    return outs


@pytest.fixture(params=list(CONFIGS))
def family(request):
    return request.param


@torch.no_grad()
def test_full_forward_matches_backbone(family):
    # The explicit layer loop must reproduce the library's own encoder on real tokens.
    model, backbone = tiny_model(family)
    ids, mask = padded_batch()
    state = model.run_layers(model.embed(ids, mask), L)
    ref = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(state.hidden[real], ref[real], atol=ATOL)


@torch.no_grad()
def test_slices_match_full_forward(family):
    model, _ = tiny_model(family)
    ids, mask = padded_batch()
    full = model(ids, mask)
    assert [o.layer for o in full] == [1, 2, 3, 4]
    mobile, edge, cloud = chain([model] * 3, ids, mask, [M, E, L])
    for out, layer in [(mobile, M), (edge, E), (cloud, L)]:
        assert out.layer == layer
        assert torch.allclose(out.logits, full[layer - 1].logits, atol=ATOL)
        assert torch.allclose(out.pooled, full[layer - 1].pooled, atol=ATOL)
    _, hard = chain([model] * 2, ids, mask, [M, L])  # mobile then straight to cloud
    assert torch.allclose(hard.logits, full[L - 1].logits, atol=ATOL)


def roundtrip_tier(model, start, end, embeddings, heads):
    """Save a tier view's state_dict and load it, strictly, into a freshly built tier module."""
    buf = io.BytesIO()
    torch.save(model.tier(start, end, embeddings, heads).state_dict(), buf)
    buf.seek(0)
    fresh = MultiExitEncoder.empty_tier(model.config, model.num_labels, start, end, embeddings, heads)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    return fresh.eval()


@torch.no_grad()
def test_tier_modules_reproduce_full_model(family):
    model, _ = tiny_model(family)
    ids, mask = padded_batch()
    full = model(ids, mask)
    mobile = roundtrip_tier(model, 0, M, True, [M])
    edge = roundtrip_tier(model, M, E, False, [E])
    cloud = roundtrip_tier(model, E, L, False, [L])
    outs = chain([mobile, edge, cloud], ids, mask, [M, E, L])
    for out, layer in zip(outs, [M, E, L]):
        assert torch.allclose(out.logits, full[layer - 1].logits, atol=ATOL)
    # mobile -> cloud replica holding layers [m, L)
    cloud_from_m = roundtrip_tier(model, M, L, False, [L])
    _, hard = chain([mobile, cloud_from_m], ids, mask, [M, L])
    assert torch.allclose(hard.logits, full[L - 1].logits, atol=ATOL)


def test_tier_holds_only_its_parts(family):
    model, _ = tiny_model(family)
    mobile = model.tier(0, M, True, [M])
    edge = model.tier(M, E, False, [E])
    mobile_keys = set(mobile.state_dict())
    assert not any(k.startswith(f"layers.{i}.") for k in mobile_keys for i in range(M, L))
    assert set(mobile.heads) == {str(M)}
    assert any(k.startswith("embeddings.") for k in mobile_keys)
    assert not any(k.startswith("embeddings.") for k in edge.state_dict())
    assert mobile.parameter_bytes()[1] + edge.parameter_bytes()[1] < model.parameter_bytes()[1]
    # the freshly built tier allocates exactly what the view holds
    fresh = MultiExitEncoder.empty_tier(model.config, 3, M, E, False, [E])
    assert set(fresh.state_dict()) == set(edge.state_dict())
    assert fresh.parameter_bytes() == edge.parameter_bytes()


@torch.no_grad()
def test_tier_refuses_what_it_does_not_hold():
    model, _ = tiny_model("bert")
    ids, mask = padded_batch()
    mobile = model.tier(0, M, True, [M])
    edge = model.tier(M, E, False, [E])
    state = mobile.run_layers(mobile.embed(ids, mask), M)
    with pytest.raises(ValueError, match=r"cannot run layers \[1, 4\)"):
        edge.run_layers(state, L)  # edge holds [1, 3) only
    with pytest.raises(ValueError, match="cannot run layers"):
        mobile.run_layers(state, E)
    with pytest.raises(RuntimeError, match="no exit head for layer 2"):
        mobile.exit(edge.run_layers(state, 2))
    with pytest.raises(RuntimeError, match="no embeddings"):
        edge.embed(ids, mask)
    with pytest.raises(ValueError, match="cannot run layers"):
        model.run_layers(state, L + 1)


@torch.no_grad()
def test_exits_are_per_sample(family):
    model, _ = tiny_model(family)
    ids, mask = padded_batch()
    batch = chain([model] * 3, ids, mask, [M, E, L])
    for out in batch:
        assert out.confidence.shape == (3,) and out.prediction.shape == (3,)
        probs = out.logits.softmax(-1)
        assert torch.allclose(out.confidence, probs.max(-1).values)
        assert torch.equal(out.prediction, probs.argmax(-1))
    # sample 2 has two real tokens: alone and unpadded it must give what it gave in the batch
    alone = chain([model] * 3, ids[2:3, :2], mask[2:3, :2], [M, E, L])
    for one, many in zip(alone, batch):
        assert torch.allclose(one.logits[0], many.logits[2], atol=ATOL)
        assert torch.allclose(one.confidence[0], many.confidence[2], atol=ATOL)


GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64, bos_token_id=0, eos_token_id=0)


def test_constructor_names_unsupported_family():
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        MultiExitEncoder(GPT2Config(**GPT2), 2, None, [], 0, {})


@pytest.mark.parametrize("build", ["from_backbone", "empty_tier"])
def test_unsupported_family_is_named(build):
    config = GPT2Config(**GPT2)
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        if build == "from_backbone":
            MultiExitEncoder.from_backbone(AutoModel.from_config(config), num_labels=2)
        else:
            MultiExitEncoder.empty_tier(config, 2, 0, 1, True, [1])


def test_default_backbone_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = resolve_backbone("default")
    assert (Path(path) / "config.json").is_file()
    model = MultiExitEncoder.from_pretrained(path, 2)
    assert model.num_layers == 6 and len(model.layers) == 6
    assert model.config.hidden_size == 384
    assert sorted(model.heads, key=int) == [str(i) for i in range(1, 7)]


@torch.no_grad()
def test_onnx_runtime_runs_every_family_as_torch_does(family):
    """The tiers' layers exported to ONNX Runtime (dimee_models/onnx_layers.py) answer as the torch
    module does, for batches longer and shorter than the export's example, padded or not."""
    from dimee_models.onnx_layers import OnnxLayers

    model, _ = tiny_model(family)
    onnx = OnnxLayers(model, {0, M}, L, threads=1)
    for length in (3, 9):
        ids, mask = padded_batch(length=length)
        for start in (0, M, L):  # L: no layer, the exit head alone, exported when first asked for
            state = model.run_layers(model.embed(ids, mask), start)
            last = model.run_layers(state, L)
            logits, pooled, hidden = onnx.run(state)
            assert torch.allclose(torch.from_numpy(logits), model.exit(last).logits, atol=ATOL)
            assert torch.allclose(torch.from_numpy(pooled), model.exit(last).pooled, atol=ATOL)
            real = mask.bool()
            assert torch.allclose(torch.from_numpy(hidden)[real], last.hidden[real], atol=1e-4)


@torch.no_grad()
def test_an_int8_slice_answers_each_row_as_it_does_alone():
    """An int8 slice (MatMulNBits) scales each row's activations on its own: a row's answer does not
    depend on the batch it ran in, so offline outputs certify what is served; it stays near float32's."""
    from dimee_models.onnx_layers import OnnxLayers

    model, _ = tiny_model("bert")
    int8 = OnnxLayers(model, {0}, M, threads=1, int8=True)
    ids, mask = padded_batch(length=9)
    logits, _, hidden = int8.run(model.embed(ids, mask))
    for row in range(len(ids)):
        n = int(mask[row].sum())
        alone, _, alone_hidden = int8.run(model.embed(ids[row:row + 1, :n], mask[row:row + 1, :n]))
        np.testing.assert_allclose(alone[0], logits[row], atol=ATOL)
        np.testing.assert_allclose(alone_hidden[0], hidden[row, :n], atol=1e-4)
    float32 = model.exit(model.run_layers(model.embed(ids, mask), M)).logits.numpy()
    assert not np.allclose(logits, float32, atol=ATOL)  # int8 products, not float32's
    np.testing.assert_allclose(logits, float32, atol=0.05)
