"""Artifact round trip on a tiny BERT: checksums, tier files, tampering, no pickles."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer, BertConfig

from dimee_models import artifact
from dimee_models.artifact import ArtifactError
from dimee_models.data import TextDataset, split
from dimee_models.manifest import FORMAT_VERSION, default_exits, public_model_name, tier_specs
from dimee_models.model import MultiExitEncoder
from dimee_models.tiers import TIER_NAMES, Tier
from tests.conftest import HOSTILE_TEXTS, tiny_facts
from dimee_models.train import resolve_backbone

EXITS = {"mobile": 1, "edge": 3}
ATOL = 1e-5


def tiny_model() -> MultiExitEncoder:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                        vocab_size=99, max_position_embeddings=64)
    return MultiExitEncoder.from_backbone(AutoModel.from_config(config), num_labels=3).eval()


def tiny_splits():
    ds = TextDataset("x", [f"text {i}" for i in range(20)], [i % 3 for i in range(20)], ["a", "b", "c"])
    return split(ds, (0.6, 0.2, 0.2), seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(directory, model, splits) of one artifact shared by the module; tests must not modify it."""
    out = tmp_path_factory.mktemp("artifact")
    model, splits = tiny_model(), tiny_splits()
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("default"))
    artifact.save(out, model, tokenizer, splits, tiny_facts("x", ["a", "b", "c"], dict(EXITS)))
    return out, model, splits


@pytest.fixture
def copy(saved, tmp_path):
    """A private copy of the artifact for tests that damage it."""
    return shutil.copytree(saved[0], tmp_path / "a")


def batch():
    ids = torch.randint(5, 99, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 3:] = 0
    return ids, mask


def test_manifest_verifies_and_describes_the_model(saved):
    out, model, splits = saved
    m = artifact.read_manifest(out)
    assert m.format_version == FORMAT_VERSION
    assert (m.model_type, m.num_layers, m.hidden_size, m.num_labels) == ("bert", 4, 32, 3)
    assert m.exits.model_dump() == EXITS and m.backbone == "tiny"
    assert m.split_sizes.model_dump() == {"train": 12, "calibration": 4, "test": 4}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m.files) == on_disk  # every file is checksummed
    assert m.tiers["mobile"].layers == [1, 1] and m.tiers["edge"].layers == [2, 3]
    assert m.tiers["cloud"].exit_heads == [1, 2, 3, 4]
    assert m.tiers["cloud"].parameters == model.parameter_bytes()[0]
    assert m.specs() == tier_specs(4, 1, 3)


@torch.no_grad()
def test_loaded_tiers_reproduce_the_model(saved):
    out, model, _ = saved
    ids, mask = batch()
    full = model(ids, mask)
    mobile, edge, cloud = (artifact.load_tier(out, t) for t in Tier)
    assert not mobile.training and edge.embeddings is None and len(edge.layers) == 2
    state = mobile.run_layers(mobile.embed(ids, mask), 1)
    assert torch.allclose(mobile.exit(state).logits, full[0].logits, atol=ATOL)
    assert torch.allclose(edge.exit(edge.run_layers(state, 3)).logits, full[2].logits, atol=ATOL)
    # cloud holds the full model: it continues from mobile's hidden state or runs from scratch
    assert torch.allclose(cloud.exit(cloud.run_layers(state, 4)).logits, full[3].logits, atol=ATOL)
    for a, b in zip(cloud(ids, mask), full):
        assert torch.allclose(a.logits, b.logits, atol=ATOL)
    manifest = artifact.read_manifest(out)
    for name, tier in zip(TIER_NAMES, (mobile, edge, cloud)):
        assert tier.parameter_bytes() == (manifest.tiers[name].parameters, manifest.tiers[name].parameter_bytes)


def test_tokenizer_and_splits_round_trip(saved):
    out, _, splits = saved
    assert artifact.load_tokenizer(out)("a film")["input_ids"][0] == 101  # BERT [CLS]
    test = artifact.load_split(out, "test")
    assert (test.texts, test.labels, test.label_names) == (splits.test.texts, splits.test.labels, ["a", "b", "c"])


def test_a_split_of_hostile_texts_round_trips(saved, tmp_path):
    """Texts with line and paragraph separators (which str.splitlines() would split at), CR, NUL,
    a BOM, emoji, RTL, very long and duplicate ones come back from the split file unchanged."""
    texts = HOSTILE_TEXTS + ["cr\rlf\r\n", " "]
    (tmp_path / "splits").mkdir()
    artifact.write_jsonl(tmp_path / "splits" / "test.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(texts)])
    back = artifact.load_split(tmp_path, "test", artifact.read_manifest(saved[0]))
    assert back.texts == texts and back.labels == [i % 2 for i in range(len(texts))]


def test_no_pickles(saved):
    out = saved[0]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}]
    tensors = [p for p in files if p.suffix == ".safetensors"]
    assert sorted(p.name for p in tensors) == ["cloud.safetensors", "edge.safetensors", "mobile.safetensors"]
    for p in tensors:
        with safe_open(p, framework="pt") as f:
            assert f.keys()
    for p in set(files) - set(tensors):
        p.read_text(encoding="utf-8")  # everything else is text, so cannot be a pickle


@pytest.mark.parametrize("name", ["edge.safetensors", "splits/test.jsonl", "config.json"])
def test_modified_file_is_named(copy, name):
    path = copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"modified.*{name}"):
        artifact.read_manifest(copy)
    assert artifact.read_manifest(copy, verify=False).exits.model_dump() == EXITS


def test_the_cluster_profile_is_kept_but_not_checksummed(copy):
    """`dimee up` re-measures the cluster into the artifact; that must not void the model's checksums."""
    (copy / artifact.CLUSTER_PROFILE).write_text("{}")
    manifest = artifact.write_manifest(copy, artifact.read_manifest(copy))
    assert artifact.CLUSTER_PROFILE not in manifest.files
    (copy / artifact.CLUSTER_PROFILE).write_text('{"measured": "again"}')
    artifact.read_manifest(copy)


def test_deleted_file_is_named(copy):
    (copy / "mobile.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing.*mobile.safetensors"):
        artifact.read_manifest(copy)
    with pytest.raises(ArtifactError, match="missing.*mobile.safetensors"):
        artifact.load_tier(copy, Tier.MOBILE)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not a DIMEE artifact"):
        artifact.read_manifest(tmp_path)


@pytest.mark.parametrize("text, match", [("{oops", "not valid JSON"), ('{"format_version": 99}', "unsupported format_version 99")])
def test_bad_manifest(tmp_path, text, match):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ArtifactError, match=match):
        artifact.read_manifest(tmp_path)


@pytest.mark.parametrize("change, field, message", [
    (lambda m: m["exits"].pop("edge"), "exits.edge", "Field required"),
    (lambda m: m.update(num_layers="six"), "num_layers", "Input should be a valid integer"),
    (lambda m: m["tiers"]["cloud"].update(layers="1..4"), "tiers.cloud.layers", "Input should be a valid list"),
    (lambda m: m.update(policy={"default": "dimee"}), "policy.file", "Field required"),
    (lambda m: m.update(extra=1), "extra", "Extra inputs are not permitted"),
])
def test_an_invalid_field_is_named_in_one_line(copy, change, field, message):
    doc = json.loads((copy / "manifest.json").read_text())
    change(doc)
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError) as err:
        artifact.read_manifest(copy)
    assert str(err.value).startswith(f"{copy / 'manifest.json'}: invalid field {field}: {message}")
    assert "\n" not in str(err.value)


def test_tier_specs_and_exits():
    specs = tier_specs(6, 2, 4)
    assert (specs[Tier.MOBILE].start, specs[Tier.MOBILE].end, specs[Tier.MOBILE].embeddings) == (0, 2, True)
    assert (specs[Tier.EDGE].start, specs[Tier.EDGE].end, specs[Tier.EDGE].head_layers) == (2, 4, (4,))
    assert specs[Tier.CLOUD].head_layers == (1, 2, 3, 4, 5, 6)
    assert default_exits(6) == (2, 4) and default_exits(12) == (4, 8)
    assert tier_specs(6, 5, 6)[Tier.EDGE].head_layers == (6,)  # edge may run to the end
    for m, e in [(0, 2), (2, 2), (3, 2), (6, 6), (2, 7)]:
        with pytest.raises(ValueError, match="exits must satisfy"):
            tier_specs(6, m, e)


def test_manifest_is_plain_json(saved):
    # the manifest is meant to be read by humans and other tools too
    doc = json.loads((saved[0] / "manifest.json").read_text())
    assert doc["dataset"]["name"] == "x" and "policy" not in doc  # not null: absent until calibration


@pytest.mark.parametrize("backbone,dataset,name", [
    ("sentence-transformers/all-MiniLM-L6-v2", "rt-polarity", "sentence-transformers/all-MiniLM-L6-v2@rt-polarity"),
    ("/home/me/models/all-mpnet-base-v2", "csv:/home/me/data/reviews.csv", "all-mpnet-base-v2@csv:reviews.csv"),
    ("./backbones/tiny", "jsonl:data/x.jsonl", "tiny@jsonl:x.jsonl"),
])
def test_answers_name_the_model_without_server_paths(backbone, dataset, name):
    assert public_model_name(backbone, dataset) == name
