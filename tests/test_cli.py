"""`dimee train`, `dimee info` and the serving flags: bad input gives exit code 2 and a message, not a
traceback."""

import json
import shutil

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig

from deployments import cli as serve_cli
from dimee_models import artifact
from dimee_models.cli import build_parser, main
from dimee_models.data import TextDataset, split
from dimee_models.model import MultiExitEncoder
from dimee_models.train import resolve_backbone


def run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def parse_error(argv, capsys) -> str:
    """argparse rejects the input before any command runs: SystemExit 2, usage on stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def write_csv(path, rows=10):
    path.write_text("text,label\n" + "".join(f"sample {i},{'ab'[i % 2]}\n" for i in range(rows)))
    return path


def train_args(tmp_path, dataset, *extra):
    return ["train", "--dataset", dataset, "--out", str(tmp_path / "out"), *extra]


def test_unknown_dataset(tmp_path, capsys):
    code, _, err = run(train_args(tmp_path, "nope"), capsys)
    assert code == 2
    assert "dimee train: error: unknown dataset 'nope'" in err
    assert not (tmp_path / "out").exists()


def test_missing_column_is_named(tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv")
    code, _, err = run(train_args(tmp_path, f"csv:{data}", "--label-column", "stars"), capsys)
    assert code == 2 and "no column 'stars'" in err


def test_missing_dataset_file(tmp_path, capsys):
    code, _, err = run(train_args(tmp_path, f"jsonl:{tmp_path / 'gone.jsonl'}"), capsys)
    assert code == 2 and "not found" in err and "gone.jsonl" in err


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--epochs", "two"), ("--splits", "1,2"),
                                         ("--splits", "a,b,c"), ("--lr", "-1"), ("--batch-size", "0")])
def test_bad_flag_values(tmp_path, capsys, flag, value):
    err = parse_error(train_args(tmp_path, "trec6", flag, value), capsys)
    assert f"argument {flag}" in err and repr(value) in err


def test_bad_split_fractions(tmp_path, capsys):
    code, _, err = run(train_args(tmp_path, "trec6", "--splits", "0.5,0.5,0.5"), capsys)
    assert code == 2 and "split fractions" in err


def test_missing_required_flag(capsys):
    assert "--out" in parse_error(["train", "--dataset", "trec6"], capsys)


def test_bad_exits(tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv")
    code, _, err = run(train_args(tmp_path, f"csv:{data}", "--mobile-exit", "4", "--edge-exit", "3"), capsys)
    assert code == 2 and "exits must satisfy" in err


def test_out_not_empty(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    code, _, err = run(train_args(tmp_path, "trec6"), capsys)
    assert code == 2 and "exists and is not empty" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_missing_backbone_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_csv(tmp_path / "d.csv")
    code, _, err = run(train_args(tmp_path, f"csv:{data}", "--backbone", str(tmp_path / "no-model")), capsys)
    assert code == 2 and "no-model" in err


def test_info_on_non_artifact(tmp_path, capsys):
    code, out, err = run(["info", str(tmp_path)], capsys)
    assert code == 2 and out == ""
    assert "dimee info: error:" in err and "not a DIMEE artifact" in err and "manifest.json" in err


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                        vocab_size=99, max_position_embeddings=64)
    model = MultiExitEncoder.from_backbone(AutoModel.from_config(config), num_labels=2)
    ds = TextDataset("tiny", [f"t{i}" for i in range(10)], [i % 2 for i in range(10)], ["a", "b"])
    out = tmp_path_factory.mktemp("artifact")
    artifact.save(out, model, AutoTokenizer.from_pretrained(resolve_backbone("default")), split(ds, (0.6, 0.2, 0.2), 0),
                  {"backbone": "tiny", "labels": ["a", "b"], "task": "classification", "text_pair": False,
                   "max_length": 16, "exits": {"mobile": 1, "edge": 3}, "dataset": {"name": "tiny"},
                   "metrics": {"calibration_exit_accuracy": [0.5, 0.5, 0.75, 1.0]}})
    return out


def test_info_prints_tiers(tiny_artifact, capsys):
    code, out, _ = run(["info", str(tiny_artifact)], capsys)
    assert code == 0
    assert "bert, 4 layers, hidden 32" in out
    assert "mobile after layer 1, edge after layer 3" in out
    assert "tier mobile layers 1..1, heads [1]" in out
    assert "tier edge   layers 2..3, heads [3]" in out
    assert "tier cloud  layers 1..4, heads [1, 2, 3, 4]" in out
    assert "calibration_exit_accuracy: 1:0.5000 2:0.5000 3:0.7500 4:1.0000" in out
    assert "verified by sha256" in out


def test_info_json(tiny_artifact, capsys):
    code, out, _ = run(["info", "--json", str(tiny_artifact)], capsys)
    assert code == 0 and json.loads(out) == artifact.read_manifest(tiny_artifact)


def test_info_reports_tampering(tiny_artifact, tmp_path, capsys):
    copy = shutil.copytree(tiny_artifact, tmp_path / "a")
    (copy / "splits" / "test.jsonl").write_text("changed\n")
    code, _, err = run(["info", str(copy)], capsys)
    assert code == 2 and "modified" in err and "test.jsonl" in err


@pytest.mark.parametrize("command", [["serve", "some/artifact"], ["up"]])
def test_api_key_env_must_name_a_set_variable(command, capsys, monkeypatch):
    monkeypatch.delenv("DIMEE_TEST_KEY", raising=False)
    for value in (None, ""):
        if value is not None:
            monkeypatch.setenv("DIMEE_TEST_KEY", value)
        with pytest.raises(SystemExit) as exc:
            serve_cli.main([*command, "--api-key-env", "DIMEE_TEST_KEY"])  # refused before Ray or training start
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "argument --api-key-env" in err and "'DIMEE_TEST_KEY' is unset or empty" in err


def test_api_key_env_names_the_variable_not_the_key(monkeypatch):
    monkeypatch.setenv("DIMEE_TEST_KEY", "s3cret")
    args = build_parser(serve_cli.add_commands).parse_args(["serve", "a", "--api-key-env", "DIMEE_TEST_KEY"])
    assert args.api_key_env == "DIMEE_TEST_KEY"
    assert build_parser(serve_cli.add_commands).parse_args(["serve", "a"]).api_key_env is None


def test_timeouts_are_refused_unless_positive_and_reach_the_routers_settings(capsys):
    with pytest.raises(SystemExit) as exc:
        serve_cli.main(["serve", "some/artifact", "--hop-timeout", "0"])
    assert exc.value.code == 2 and "argument --hop-timeout" in capsys.readouterr().err
    args = build_parser(serve_cli.add_commands).parse_args(["up", "--hop-timeout", "30", "--request-timeout", "45"])
    assert (args.hop_timeout, args.request_timeout) == (30.0, 45.0)


def test_node_down_and_up_need_a_tier(capsys):
    for action in ("node-down", "node-up"):
        assert serve_cli.main(["cluster", action]) == 2  # refused before any Ray process is touched
        assert f"dimee cluster: error: {action} needs the tier" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        serve_cli.main(["cluster", "node-down", "gpu"])
    assert exc.value.code == 2 and "invalid choice: 'gpu'" in capsys.readouterr().err


def test_serve_refuses_a_wrong_artifact_and_a_missing_cluster_within_seconds(served_artifact, tmp_path, capsys):
    """Before, `dimee serve` with no cluster hung for minutes printing Ray's connection warnings."""
    import time

    began = time.monotonic()
    assert serve_cli.main(["serve", str(tmp_path / "nope")]) == 2
    assert "is not a DIMEE artifact" in capsys.readouterr().err
    assert serve_cli.main(["serve", str(served_artifact), "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "no Ray cluster answers at 127.0.0.1:1" in err and "dimee cluster up" in err and "Traceback" not in err
    assert time.monotonic() - began < 10


def test_a_cluster_address_is_checked_with_or_without_a_scheme():
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1", "no-port"):
        with pytest.raises(ValueError, match=f"no Ray cluster answers at {address}"):
            serve_cli.check_cluster_answers(address, timeout_s=1)
