"""Calibration, evaluation table, CLI and offline prediction on a tiny real artifact."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig

from dimee_models import artifact, calibration
from dimee_models.calibration import write_calibration
from dimee_models.cli import main
from dimee_models.cost import PATHS, CostModel
from dimee_models.data import Splits, TextDataset
from dimee_models.evaluate import predict_texts, run_evaluation
from dimee_models.manifest import PolicyRef
from dimee_models.model import MultiExitEncoder
from dimee_models.outputs import split_outputs
from dimee_models.policy import EDGE_CLOUD, CloudOnlyPolicy, load_policies
from dimee_models.tiers import Tier
from dimee_models.batching import encode, model_inputs
from dimee_models.train import resolve_backbone, weighted_exit_loss
from tests.conftest import add_policy, tiny_facts

VOCAB = (["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"],
         ["engine", "wheel", "brake", "piston", "gear", "clutch", "motor", "tire"])
METHODS = {"cloud_only", "mobile_only", "edge_only", "random",
           "oracle", "dimee", "dimee_constrained", "dimee_learned", "dimee_learned_constrained",
           "dimee_escalate", "dimee_escalate_constrained", "dimee_cascade", "dimee_cascade_constrained",
           "dimee_direct_cascade", "dimee_direct_cascade_constrained"}
ROW_KEYS = {"accuracy", "accuracy_drop_pp", "accuracy_drop_pp_ci95", "cost", "cost_reduction", "tier_fraction"}
POLICY_FILES = ("policy.json", "policy.safetensors")


def texts(n: int, seed: int) -> TextDataset:
    """Class 0 speaks of fruit, class 1 of cars; 3-6 words each, 35% of them from the other class
    (so the exits disagree and confidences vary)."""
    rng = np.random.default_rng(seed)
    labels = [int(i % 2) for i in range(n)]
    words = [" ".join(rng.choice(VOCAB[y if rng.random() > 0.35 else 1 - y]) for _ in range(rng.integers(3, 7)))
             for y in labels]
    return TextDataset("toy", words, labels, ["fruit", "car"])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An uncalibrated artifact: tiny 6-layer BERT (exits 2 and 4) briefly trained on 60 texts."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("default"))
    config = BertConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=37,
                        vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    model = MultiExitEncoder.from_backbone(AutoModel.from_config(config), num_labels=2)
    splits = Splits(texts(60, 0), texts(40, 1), texts(40, 2))
    enc, labels = encode(tokenizer, splits.train.texts, None, 16), torch.tensor(splits.train.labels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(6):
        opt.zero_grad()
        weighted_exit_loss(model(**model_inputs(enc)), labels).backward()
        opt.step()
    out = tmp_path_factory.mktemp("eval") / "base"
    artifact.save(out, model.eval(), tokenizer, splits, tiny_facts("toy", ["fruit", "car"], {"mobile": 2, "edge": 4}))
    return out


@pytest.fixture(scope="module")
def calibrated(base, tmp_path_factory):
    """(directory, policy doc, files present right after calibration). The point estimate: 40
    calibration samples certify no saving at 0.3 pp, and the tests below need policies that route."""
    out = shutil.copytree(base, tmp_path_factory.mktemp("eval") / "cal")
    doc = write_calibration(out, CostModel(), 0.3, delta=None)
    return out, doc, {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def check_shape(result: dict) -> None:
    assert set(result) == {"dataset", "split", "n", "cost_model", "methods"}
    assert result["split"] == "test" and result["n"] == 40 and result["dataset"] == "toy"
    assert result["cost_model"] == CostModel().model_dump()
    methods = result["methods"]
    assert set(methods) == METHODS
    for name, row in methods.items():
        assert set(row) == ROW_KEYS, name
        assert 0.0 <= row["accuracy"] <= 1.0, name
        assert set(row["tier_fraction"]) == {"mobile", "edge", "cloud"}, name
        assert sum(row["tier_fraction"].values()) == pytest.approx(1.0), name
        assert row["accuracy"] <= methods["oracle"]["accuracy"], name
        ref = methods["cloud_only"]["accuracy"]
        assert row["accuracy_drop_pp"] == pytest.approx((ref - row["accuracy"]) * 100), name
        assert row["cost_reduction"] == pytest.approx(1 - row["cost"] / 1.1), name  # cloud_only = 0.5 + 0.1 * 6
    assert methods["cloud_only"]["cost_reduction"] == pytest.approx(0.0)
    assert methods["cloud_only"]["accuracy_drop_pp"] == pytest.approx(0.0)
    assert methods["cloud_only"]["tier_fraction"]["cloud"] == 1.0
    assert methods["mobile_only"]["cost"] == pytest.approx(0.2) and methods["edge_only"]["cost"] == pytest.approx(0.6)


def test_calibration_writes_policy_and_caches_outputs(calibrated, monkeypatch):
    out, doc, files = calibrated
    manifest = artifact.read_manifest(out)  # checksums still verify
    for name in (*POLICY_FILES, "outputs/calibration.safetensors"):
        assert name in files and manifest.files[name] == artifact.sha256(out / name)
    assert "outputs/test.safetensors" not in files  # calibration computed nothing on the test split
    assert manifest.policy == PolicyRef(default=doc.default, file="policy.json")
    assert list(json.loads((out / "manifest.json").read_text()))[-2:] == ["files", "policy"]
    policies, stored = load_policies(out)
    assert doc.default in policies and doc.default.endswith("_constrained")
    assert "cascade_thresholds" not in stored  # the cascade is a stored policy kind, dimee_cascade
    first = split_outputs(out, "calibration")
    assert first.logits.shape == (40, 6, 2) and first.z.shape == (40, 32)
    monkeypatch.setattr(artifact, "load_full", lambda *a, **k: pytest.fail("cache not used"))
    again = split_outputs(out, "calibration")
    np.testing.assert_array_equal(again.logits, first.logits)
    np.testing.assert_array_equal(again.labels, [int(y) for y in artifact.load_split(out, "calibration").labels])


def test_calibration_never_reads_the_test_split(base, calibrated, tmp_path):
    poisoned = shutil.copytree(base, tmp_path / "poisoned")
    clean = artifact.load_split(base, "test")
    rows = [{"text": f"@@ zzqx {i} ## !!", "label": 1 - y} for i, y in enumerate(clean.labels)]
    artifact.write_jsonl(poisoned / "splits" / "test.jsonl", rows)
    artifact.write_manifest(poisoned, artifact.read_manifest(poisoned, verify=False))
    poison = artifact.load_split(poisoned, "test")  # in place, and the manifest verifies it
    assert not set(poison.texts) & set(clean.texts) and all(a != b for a, b in zip(poison.labels, clean.labels))
    write_calibration(poisoned, CostModel(), 0.3, delta=None)
    for name in POLICY_FILES:
        assert (poisoned / name).read_bytes() == (calibrated[0] / name).read_bytes(), name
    assert not (poisoned / "outputs" / "test.safetensors").exists()


def test_run_evaluation_shape(calibrated):
    out = calibrated[0]
    result, cal_out, test_out = run_evaluation(out)
    check_shape(result)
    json.dumps(result)  # plain JSON types only
    assert len(cal_out.labels) == 40 and len(test_out.labels) == 40
    methods = result["methods"]
    for k, name in enumerate(("mobile_only", "edge_only", "cloud_only")):
        assert methods[name]["accuracy"] == pytest.approx((test_out.tier_predictions[:, k] == test_out.labels).mean())


def test_cli_evaluate_writes_json_and_png(calibrated, tmp_path, capsys):
    out = calibrated[0]
    table, png = tmp_path / "table.json", tmp_path / "curve.png"
    assert main(["evaluate", str(out), "--json", str(table), "--plot", str(png)]) == 0
    assert "cloud_only" in capsys.readouterr().out
    check_shape(json.loads(table.read_text()))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_calibrate_delta(base, tmp_path, capsys):
    out = shutil.copytree(base, tmp_path / "a")
    assert main(["calibrate", str(out), "--delta", "none"]) == 0
    _, doc = load_policies(out)
    assert doc.delta is None and not any("risk" in p for p in doc.policies.values())
    assert main(["calibrate", str(out), "--delta", "0.2", "--max-accuracy-drop", "5"]) == 0
    assert "losses, loss rate <=" in capsys.readouterr().out
    policies, doc = load_policies(out)
    assert doc.delta == 0.2 and doc.folds == 5
    assert {p.risk.delta for name, p in policies.items() if name.endswith("_constrained")} == {0.2}
    for bad in ("1.5", "0", "x"):
        with pytest.raises(SystemExit):
            main(["calibrate", str(out), "--delta", bad])
        assert "--delta" in capsys.readouterr().err


def test_the_guaranteed_default_is_the_first_guaranteed_in_a_fixed_order(calibrated, monkeypatch):
    out = split_outputs(calibrated[0], "calibration")
    real = calibration.calibrate(out, CostModel(), 50.0, delta=0.1)  # a budget so wide every kind is certified
    assert all(p.risk.guaranteed for name, p in real.policies.items() if name.endswith("_constrained"))
    assert calibration.calibrate_all(out, CostModel(), 50.0, 0.1)[1] == "dimee_cascade_constrained"

    def with_guaranteed(*names):
        policies = {name: dataclasses.replace(p, risk=dataclasses.replace(p.risk, guaranteed=name in names))
                    if p.risk else p for name, p in real.policies.items()}
        monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: dataclasses.replace(real, policies=policies))
        return calibration.calibrate_all(out, CostModel(), 50.0, 0.1)[1]

    assert with_guaranteed("dimee_learned_constrained", "dimee_constrained") == "dimee_learned_constrained"
    assert with_guaranteed("dimee_constrained") == "dimee_constrained"
    assert with_guaranteed() == "dimee_cascade_constrained"  # none: the first, marked not guaranteed


def test_where_no_split_is_cheaper_than_cloud_only_everything_goes_to_cloud(calibrated):
    out = split_outputs(calibrated[0], "calibration")
    assert calibration.calibrate_all(out, CostModel(), 50.0, 0.1)[1] != calibration.NO_SPLIT
    # a slow mobile device and hops dearer than the whole model on cloud: any split costs more
    costly = CostModel(unit="ms", fixed=10, lambda_mobile=50, lambda_edge=5, lambda_cloud=4, o_1=40, o_2=40,
                       o_cloud_only=6, o_edge_cloud=40)
    for delta in (0.1, None):
        cal, default = calibration.calibrate_all(out, costly, 50.0, delta)
        assert default == calibration.NO_SPLIT and "served by default" in cal.warnings[-1]
        tiers, paths = cal.policies[default].assign(out.z, out.probs(2), out.probs(4))
        assert set(tiers) == {Tier.CLOUD} and set(paths) == {PATHS.index("cloud_only")}
        assert (cal.policies[default].risk is None) == (delta is None)
    assert cal.policies[default].plan("dimee").skips_mobile
    assert not cal.policies["dimee_constrained"].plan("dimee").skips_mobile
    assert calibration.calibrate_all(out, costly, 50.0, 0.1, default="dimee_constrained")[1] == "dimee_constrained"


def write_profile_of(path):
    from tests.test_profile import profile
    from dimee_models.profile import write_profile

    write_profile(path, profile())
    return path


def test_cli_calibrate_and_evaluate_with_a_cost_profile(calibrated, tmp_path, capsys):
    """The tiny profile of tests/test_profile.py: mobile 18, edge 38, cloud 41, escalated 51, cloud-only 28 ms."""
    profile = write_profile_of(tmp_path / "profile.json")
    table = tmp_path / "table.json"
    assert main(["evaluate", str(calibrated[0]), "--cost-profile", str(profile), "--json", str(table)]) == 0
    assert "ms mean" in capsys.readouterr().out
    result = json.loads(table.read_text())
    assert result["cost_model"] == CostModel().model_dump() and result["latency_model"]["unit"] == "ms"
    methods = result["methods"]
    for name, ms in (("cloud_only", 28), ("mobile_only", 18), ("edge_only", 38)):
        assert methods[name]["latency_ms"]["mean"] == pytest.approx(ms) == methods[name]["latency_ms"]["p50"]
    assert methods["mobile_only"]["latency_ms"]["saved"] == pytest.approx(1 - 18 / 28)
    for name, row in methods.items():
        f = row["tier_fraction"]
        assert 18 - 1e-9 <= row["latency_ms"]["mean"] <= 51 + 1e-9, name
        if name.endswith("_constrained") and name.startswith("dimee_learned"):  # no escalation: a mix of three paths
            assert row["latency_ms"]["mean"] == pytest.approx(18 * f["mobile"] + 38 * f["edge"] + 41 * f["cloud"])

    out = shutil.copytree(calibrated[0], tmp_path / "ms")
    assert main(["calibrate", str(out), "--cost-profile", str(profile), "--mu", "2"]) == 0
    _, doc = load_policies(out)
    assert doc.cost_model.unit == "ms" and doc.cost_model.o_cloud_only == 6.0
    assert doc.cost_model.mu == pytest.approx(2 * 1.1 / 28)
    assert main(["evaluate", str(out), "--json", str(table)]) == 0  # in ms as calibrated, and the paper's cost
    result = json.loads(table.read_text())
    assert result["cost_model"] == CostModel().model_dump() and result["latency_model"] == doc.cost_model.model_dump()
    capsys.readouterr()
    assert main(["calibrate", str(out), "--cost-profile", str(profile), "--o-1", "0.3"]) == 2
    assert "--cost-profile sets every cost" in capsys.readouterr().err
    assert main(["calibrate", str(out), "--cost-profile", str(tmp_path / "none.json")]) == 2
    assert "none.json: file not found" in capsys.readouterr().err


def test_cli_evaluate_resamples(calibrated, tmp_path, capsys):
    table = tmp_path / "table.json"
    assert main(["evaluate", str(calibrated[0]), "--resamples", "3", "--json", str(table)]) == 0
    assert "over 3 redraws" in capsys.readouterr().out
    result = json.loads(table.read_text())
    assert result["resampled"]["k"] == 3 and result["resampled"]["budget_pp"] == 0.3
    assert sum(result["resampled"]["default_choices"].values()) == 3
    for name, row in result["methods"].items():
        assert 0 <= row["resampled"]["within_budget_share"] <= 1, name
        assert row["resampled"]["cost_reduction_p10"] <= row["resampled"]["cost_reduction_p90"], name
    plain = {k: v for k, v in result.items() if k != "resampled"}  # otherwise the single-split table
    plain["methods"] = {n: {k: v for k, v in r.items() if k != "resampled"} for n, r in result["methods"].items()}
    check_shape(plain)


def test_resamples_of_an_artifact_calibrated_in_ms_recalibrate_in_ms(calibrated, tmp_path, capsys):
    """As `dimee up` left it: each redraw chooses boundaries and thresholds for the measured latency."""
    out = shutil.copytree(calibrated[0], tmp_path / "ms")
    assert main(["calibrate", str(out), "--cost-profile", str(write_profile_of(tmp_path / "p.json")),
                 "--choose-boundaries"]) == 0
    table = tmp_path / "table.json"
    assert main(["evaluate", str(out), "--resamples", "2", "--json", str(table)]) == 0
    assert "saved: ms cost" in capsys.readouterr().out
    resampled = json.loads(table.read_text())["resampled"]
    assert resampled["cost_unit"] == "ms" and all("@" in name for name in resampled["default_choices"])


def test_cli_calibrate_with_unlabeled_texts_certifies_on_them_and_resamples_with_them(base, tmp_path, capsys):
    out = shutil.copytree(base, tmp_path / "unl")
    unlabeled = tmp_path / "unlabeled.txt"
    unlabeled.write_text("\n".join(texts(50, 3).texts) + "\n")
    assert main(["calibrate", str(out), "--unlabeled", str(unlabeled)]) == 0
    assert "50 of them unlabelled" in capsys.readouterr().out
    doc = json.loads((out / "policy.json").read_text())
    assert doc["unlabeled"] == {"file": str(unlabeled.resolve()), "rows": 50}
    assert all(p["risk"]["n"] == 40 + 50 and p["risk"]["unlabeled"] == 50
               for p in doc["policies"].values() if "risk" in p and p["kind"] != "cloud_only")
    assert main(["evaluate", str(out), "--resamples", "2"]) == 0
    assert main(["calibrate", str(out), "--unlabeled", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err


def test_cli_errors(base, capsys):
    assert main(["calibrate", str(base), "--mu", "-1"]) == 2
    err = capsys.readouterr().err
    assert "cost model" in err and "mu" in err and "Traceback" not in err
    assert not (base / "policy.json").exists()
    assert main(["evaluate", str(base)]) == 2
    assert "run `dimee calibrate" in capsys.readouterr().err
    assert not (base / "outputs" / "test.safetensors").exists()


def test_predict_texts_agrees_with_split_outputs(calibrated, tmp_path):
    out = shutil.copytree(calibrated[0], tmp_path / "cal")
    add_policy(out, CloudOnlyPolicy("no_split", 2, 4, 6, {}, {}))
    rows = [0, 3, 7, 12, 25]
    test_texts = artifact.load_split(out, "test").texts
    sample = [test_texts[i] for i in rows]
    test_out = split_outputs(out, "test")
    cloud = predict_texts(out, sample, "cloud_only")
    assert [r["tier"] for r in cloud] == ["cloud"] * 5 and {r["exit_layer"] for r in cloud} == {6}
    assert [r["label_id"] for r in cloud] == test_out.logits[rows, -1].argmax(-1).tolist()
    np.testing.assert_allclose([r["confidence"] for r in cloud], test_out.tier_confidences[rows, 2], atol=1e-4)
    assert predict_texts(out, sample, "dimee", policy_name="no_split") == cloud  # the tokens to cloud, as served
    policies, doc = load_policies(out)
    mobile_probs = test_out.probs(test_out.mobile_exit)
    for name in (None, "dimee_constrained"):  # the default policy, and one that splits this data three ways
        policy = policies[name or doc.default]
        tiers, paths = policy.assign(test_out.z, mobile_probs, test_out.probs(test_out.edge_exit))
        rows = [int(i) for t in range(3) for i in np.flatnonzero(tiers == t)[:2]]  # up to two rows per tier
        expected = tiers[rows]
        if name:
            assert len(set(expected.tolist())) == 3
        dimee = predict_texts(out, [test_texts[i] for i in rows], "dimee", policy_name=name)
        assert [r["tier"] for r in dimee] == [("mobile", "edge", "cloud")[t] for t in expected]
        assert [r["label_id"] for r in dimee] == test_out.tier_predictions[rows, expected].tolist()
        assert [r["exit_layer"] for r in dimee] == [(2, 4, 6)[t] for t in expected]
        assert [r["escalated"] for r in dimee] == (paths[rows] == EDGE_CLOUD).tolist()


def test_predicted_latency_is_set_beside_the_measured_one(calibrated, tmp_path):
    from analysis.latency_prediction import compare

    rows = compare(calibrated[0], write_profile_of(tmp_path / "p.json"),
                   {"mobile_only": 20.0, "edge_only": 38.0, "cloud_only": 35.0, "dimee": 30.0})
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["dimee"]["method"] == calibrated[1].default
    assert by_mode["mobile_only"]["predicted_ms"] == pytest.approx(18) and by_mode["edge_only"]["error"] == 0
    assert by_mode["cloud_only"]["error"] == pytest.approx(28 / 35 - 1)
