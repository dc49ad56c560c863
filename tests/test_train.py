"""The weighted exit loss, a few optimisation steps on a tiny model, and one end-to-end train()."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, BertConfig

from dimee_models import artifact
from dimee_models.model import ExitOutput, MultiExitEncoder
from dimee_models.tiers import Tier
from dimee_models.train import TrainConfig, distill_loss, length_grouped, train, weighted_exit_loss


def fake_exit(logits: torch.Tensor, layer: int) -> ExitOutput:
    batch = logits.shape[0]
    return ExitOutput(logits, torch.ones(batch), torch.zeros(batch, dtype=torch.long), torch.zeros(batch, 4), layer)


def test_weighted_loss_weighs_deeper_exits_more():
    torch.manual_seed(0)
    labels = torch.tensor([0, 2, 1, 1])
    outputs = [fake_exit(torch.randn(4, 3), layer) for layer in (1, 2, 3)]
    ce = [F.cross_entropy(o.logits, labels).item() for o in outputs]
    expected = (1 * ce[0] + 2 * ce[1] + 3 * ce[2]) / 6
    assert weighted_exit_loss(outputs, labels).item() == pytest.approx(expected, rel=1e-6)


def test_length_grouped_batches_cover_every_text_once_and_pad_little():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 80, 1000)
    order = length_grouped(lengths, 32, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(1000))
    batches = [order[k : k + 32] for k in range(0, 1000, 32)]
    padded = sum(lengths[b].max() * len(b) for b in batches)
    at_random = sum(lengths[b].max() * len(b) for b in np.array_split(rng.permutation(1000), range(32, 1000, 32)))
    assert padded < 1.1 * lengths.sum() < 0.7 * at_random
    assert not (order == length_grouped(lengths, 32, np.random.default_rng(2))).all()  # reshuffled


def test_weighted_loss_only_over_given_exits():
    # a model holding heads for layers 2 and 4 only: weights 2 and 4, not 1..4
    labels = torch.tensor([1, 0])
    outputs = [fake_exit(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), 2), fake_exit(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), 4)]
    ce = [F.cross_entropy(o.logits, labels).item() for o in outputs]
    assert weighted_exit_loss(outputs, labels).item() == pytest.approx((2 * ce[0] + 4 * ce[1]) / 6, rel=1e-6)


def test_distill_loss_is_zero_when_early_exits_match_the_final_one_and_positive_otherwise():
    final = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    same = [fake_exit(final.clone(), 1), fake_exit(final.clone(), 2), fake_exit(final, 3)]
    assert distill_loss(same, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    other = [fake_exit(-final, 1), fake_exit(final.clone(), 2), fake_exit(final, 3)]
    p = (final / 2).softmax(-1)
    expected = F.kl_div((-final / 2).log_softmax(-1), p, reduction="batchmean").item() / 2 * 4  # mean of 2 exits, T^2
    assert distill_loss(other, 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_few_steps_lower_the_loss():
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, vocab_size=99,
                        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = MultiExitEncoder.from_backbone(AutoModel.from_config(config), num_labels=3, dropout=0.0).train()
    ids = torch.randint(5, 99, (8, 10))
    mask = torch.ones_like(ids)
    mask[4:, 6:] = 0
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = weighted_exit_loss(model(ids, mask), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def write_tiny_csv(path, rows: int = 40) -> None:
    words = {"pos": ["great", "lovely", "fine", "superb"], "neg": ["awful", "bad", "dull", "poor"]}
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(rows):
            label = "pos" if i % 2 else "neg"
            writer.writerow([f"a {words[label][i % 4]} film number {i}", label])


def test_train_writes_a_verified_artifact(tmp_path, capsys):
    data = tmp_path / "tiny.csv"
    write_tiny_csv(data)
    cfg = TrainConfig(dataset=f"csv:{data}", epochs=1, batch_size=8, max_length=16, max_train_samples=16)
    out = tmp_path / "artifact"
    manifest = train(cfg, out)

    assert (manifest.exits.mobile, manifest.exits.edge) == (2, 4)
    assert manifest.tier_exits == {Tier.MOBILE: 2, Tier.EDGE: 4, Tier.CLOUD: 6}
    assert manifest.labels == ["neg", "pos"]
    assert manifest.task == "classification" and manifest.text_pair is False
    assert manifest.num_layers == 6 and manifest.hidden_size == 384 and manifest.num_labels == 2
    assert manifest.dataset.size == 40
    # default 65/20/15 split of 40 rows is 26/8/6; the train part is then cut to max_train_samples
    assert manifest.split_sizes.model_dump() == {"train": 16, "calibration": 8, "test": 6}
    assert sum(1 for _ in (out / "splits" / "test.jsonl").open()) == 6
    tiers = manifest.tiers
    assert set(tiers) == {"mobile", "edge", "cloud"}
    assert tiers["mobile"].layers == [1, 2] and tiers["edge"].layers == [3, 4] and tiers["cloud"].layers == [1, 6]
    assert 0 < tiers["edge"].parameters < tiers["mobile"].parameters < tiers["cloud"].parameters
    assert len(manifest.metrics["calibration_exit_accuracy"]) == 6
    files = manifest.files
    assert {"config.json", "mobile.safetensors", "edge.safetensors", "cloud.safetensors",
            "splits/train.jsonl", "splits/calibration.jsonl", "splits/test.jsonl"} <= set(files)
    assert any(name.startswith("tokenizer/") for name in files)
    assert all(len(digest) == 64 for digest in files.values())
    assert artifact.read_manifest(out) == manifest
    assert list(json.loads((out / "manifest.json").read_text())) == [  # no policy before calibration
        "format_version", "model_type", "num_layers", "hidden_size", "num_labels", "split_sizes", "backbone", "labels",
        "task", "text_pair", "max_length", "exits", "dataset", "training", "metrics", "tiers", "files"]
    assert "exit  6" in capsys.readouterr().out
