"""`dimee train`, `dimee info` and the serving flags: bad input gives exit code 2 and a message, not a
traceback."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig

from deployments import cli as serve_cli
from deployments import local_cluster
from dimee_models import artifact
from dimee_models.cli import build_parser, main
from dimee_models.data import TextDataset, split
from dimee_models.tiers import Tier
from dimee_models.model import MultiExitEncoder
from dimee_models.train import resolve_backbone
from tests.conftest import tiny_facts


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


@pytest.mark.parametrize("command", ["info", "calibrate", "evaluate"])
def test_a_command_on_a_non_artifact_names_it(command, tmp_path, capsys):
    for path in (tmp_path, tmp_path / "missing"):
        code, out, err = run([command, str(path)], capsys)
        assert code == 2 and out == ""
        assert f"dimee {command}: error: {path} is not a DIMEE artifact: manifest.json not found" in err


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                        vocab_size=99, max_position_embeddings=64)
    model = MultiExitEncoder.from_backbone(AutoModel.from_config(config), num_labels=2)
    ds = TextDataset("tiny", [f"t{i}" for i in range(10)], [i % 2 for i in range(10)], ["a", "b"])
    out = tmp_path_factory.mktemp("artifact")
    artifact.save(out, model, AutoTokenizer.from_pretrained(resolve_backbone("default")), split(ds, (0.6, 0.2, 0.2), 0),
                  tiny_facts("tiny", ["a", "b"], {"mobile": 1, "edge": 3},
                             metrics={"calibration_exit_accuracy": [0.5, 0.5, 0.75, 1.0]}))
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
    assert code == 0 and json.loads(out) == json.loads((tiny_artifact / "manifest.json").read_text())


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


def test_router_settings_are_refused_unless_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        serve_cli.main(["serve", "some/artifact", "--hop-timeout", "0"])
    assert exc.value.code == 2 and "argument --hop-timeout" in capsys.readouterr().err
    args = build_parser(serve_cli.add_commands).parse_args(["up", "--hop-timeout", "30", "--request-timeout", "45",
                                                            "--max-texts-in-flight", "128"])
    assert (args.hop_timeout, args.request_timeout, args.max_texts_in_flight) == (30.0, 45.0, 128)


def test_live_bound_flags_are_checked_and_reach_the_router_config(capsys):
    with pytest.raises(SystemExit) as exc:
        serve_cli.main(["serve", "some/artifact", "--shadow-rate", "1.5"])
    assert exc.value.code == 2 and "argument --shadow-rate: must be in [0, 1]" in capsys.readouterr().err
    args = build_parser(serve_cli.add_commands).parse_args(["up", "--shadow-rate", "0", "--on-drift", "alarm",
                                                            "--shadow-log", "/tmp/log", "--policy-artifact", "c"])
    assert (args.shadow_rate, args.on_drift, args.shadow_log, args.policy_artifact) == (0.0, "alarm", "/tmp/log", Path("c"))


def test_calibrate_takes_unlabeled_texts_or_traffic_not_both(tiny_artifact, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("a text\n")
    code, _, err = run(["calibrate", str(tiny_artifact), "--unlabeled", str(tmp_path / "t.txt"),
                        "--from-traffic", str(tmp_path)], capsys)
    assert code != 0 and "--unlabeled and --from-traffic" in err


def test_node_down_and_up_need_a_tier(capsys):
    for action in ("node-down", "node-up"):
        assert serve_cli.main(["cluster", action]) == 2  # refused before any Ray process is touched
        assert f"dimee cluster: error: {action} needs the tier" in capsys.readouterr().err
    assert serve_cli.main(["cluster", "node-down", "gpu"]) == 2
    assert "one of mobile, edge, cloud, not gpu" in capsys.readouterr().err


def test_serve_refuses_a_wrong_artifact_and_a_missing_cluster_within_seconds(served_artifact, tmp_path, capsys):
    """Before, `dimee serve` with no cluster hung for minutes printing Ray's connection warnings."""
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


def held_port(host: str = "127.0.0.1") -> socket.socket:
    """A port another program listens on."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("command", [["cluster", "up"], ["up"]])
@pytest.mark.parametrize("port", ["GCS_PORT", "DASHBOARD_PORT"])
def test_cluster_start_refuses_a_held_head_port_within_seconds(command, port, tmp_path, capsys, monkeypatch):
    """Before, Ray failed after ~50 s with a C++ check failure naming a log file."""
    with held_port(local_cluster.HEAD_IP) as sock, held_port(local_cluster.HEAD_IP) as free:
        held = sock.getsockname()[1]
        for name in ("GCS_PORT", "DASHBOARD_PORT"):  # not the real ones: a test cluster may be running
            monkeypatch.setattr(local_cluster, name, held if name == port else free.getsockname()[1])
        free.close()
        monkeypatch.setattr(local_cluster, "down", lambda: None)  # would stop a test cluster running beside us
        monkeypatch.setattr(local_cluster, "_ray", lambda *a, **k: pytest.fail("Ray was started"))
        began = time.monotonic()
        code = serve_cli.main([*command, "--artifact", str(tmp_path / "a")] if command == ["up"] else command)
    err = capsys.readouterr().err
    assert code == 2 and f"port {held} on {local_cluster.HEAD_IP} is in use" in err
    assert "`dimee down`" in err and "Traceback" not in err and time.monotonic() - began < 10
    assert not (tmp_path / "a").exists()  # refused before any training


def test_serve_and_up_refuse_an_http_port_another_program_holds(served_artifact, tmp_path, capsys, monkeypatch):
    """Before, Serve's proxy failed to bind after ~15 s, with a traceback, and stayed half-started."""
    monkeypatch.setattr(local_cluster, "down", lambda: None)
    monkeypatch.setattr(local_cluster, "check_head_ports", lambda: None)
    with held_port() as sock:
        port = str(sock.getsockname()[1])
        began = time.monotonic()
        for argv in (["serve", str(served_artifact), "--port", port], ["up", "--artifact", str(tmp_path), "--port", port]):
            assert serve_cli.main(argv) == 2
            err = capsys.readouterr().err
            assert f"port {port} on 127.0.0.1 is in use" in err and "--port" in err and "Traceback" not in err
    assert time.monotonic() - began < 10


def test_the_http_port_check_is_for_heads_on_this_machine():
    assert serve_cli.head_is_here("127.0.0.2:6390") and serve_cli.head_is_here("auto")
    assert not serve_cli.head_is_here("10.0.0.7:6379") and not serve_cli.head_is_here("ray://head.example:10001")


def start_bare_ray(env: dict) -> tuple[subprocess.Popen, str]:
    """A Ray cluster of one node with no tier label, owned by a driver process (gone with it)."""
    driver = subprocess.Popen(
        # SIGINT ends it even where it was started ignoring SIGINT (as a background job's children are)
        [sys.executable, "-c", "import ray, signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
         "ray.init(address='local', num_cpus=1, include_dashboard=False, _temp_dir='/tmp/ray_cli_test'); "
         "print(ray.get_runtime_context().gcs_address, flush=True); time.sleep(600)"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return driver, driver.stdout.readline().strip()


def dimee(argv: list[str], env: dict) -> tuple[int, str, float]:
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "deployments.cli", *argv], env=env, capture_output=True,
                            text=True, timeout=60, cwd=Path(__file__).parents[1])
    return result.returncode, result.stderr, time.monotonic() - began


@pytest.mark.cluster
def test_serve_refuses_a_cluster_that_wants_a_token_or_lacks_the_tiers(served_artifact):
    """Each within seconds, one line saying what to do (Ray alone: ~30 s of warnings, then
    'Failed to connect'; or replicas waiting forever for a node that never comes)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    with_token = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    driver, address = start_bare_ray(with_token)
    try:
        code, err, took = dimee(["serve", str(served_artifact), "--address", address], base)
        assert code == 2 and f"the Ray cluster at {address} uses token authentication" in err, err
        assert "export RAY_AUTH_MODE=token" in err and "Traceback" not in err and took < 10

        code, err, took = dimee(["serve", str(served_artifact), "--address", address], with_token)
        assert code == 2 and "no node in this Ray cluster carries the label(s) ['dimee.io/tier=mobile'" in err, err
        assert "Traceback" not in err and "Started Serve" not in err and took < 10
    finally:
        driver.send_signal(signal.SIGINT)  # the driver's exit takes its cluster down
        driver.wait(timeout=60)


@pytest.mark.cluster
def test_the_local_cluster_starts_when_a_ray_token_file_exists(tmp_path, monkeypatch):
    """Ray 2.60 turns token auth on for `ray start --head` when ~/.ray/auth_token exists (any local
    `ray.init()` writes one) but not for the nodes that join it, which were then refused."""
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    monkeypatch.setenv("HOME", str(tmp_path))
    local_cluster.down()
    try:
        local_cluster.up(nodes=(local_cluster.node_spec(Tier.MOBILE),), dashboard=False)  # raises if refused
        script = ("import ray; ray.init(address='{}', logging_level='ERROR'); "
                  "print(sorted(n['Labels'].get('dimee.io/tier', '-') for n in ray.nodes() if n['Alive']))")
        nodes = subprocess.run([sys.executable, "-c", script.format(local_cluster.address())],
                               env={**os.environ, **local_cluster.CLUSTER_ENV}, capture_output=True, text=True,
                               timeout=120)
        assert nodes.stdout.strip() == "['-', 'mobile']", nodes.stdout + nodes.stderr[-2000:]
    finally:
        local_cluster.down()


def test_up_refuses_an_artifact_path_it_cannot_train_into(tmp_path, capsys, monkeypatch):
    """Before, `dimee up` began minutes of training into a file or a folder holding something else."""
    monkeypatch.setattr(local_cluster, "down", lambda: pytest.fail("the cluster was touched"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("x")
    for path in (tmp_path / "notes", tmp_path / "notes" / "keep.txt"):
        assert serve_cli.main(["up", "--artifact", str(path)]) == 2
        assert f"--artifact {path} is not a DIMEE artifact (no manifest.json)" in capsys.readouterr().err
    assert (tmp_path / "notes" / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_a_port_out_of_range_is_refused_by_its_flag(port, capsys):
    with pytest.raises(SystemExit) as exc:
        serve_cli.main(["serve", "some/artifact", "--port", port])
    assert exc.value.code == 2 and "argument --port" in capsys.readouterr().err


def test_node_up_without_a_cluster_says_how_to_start_one(capsys, monkeypatch):
    monkeypatch.setattr(local_cluster, "address", lambda: "127.0.0.1:1")  # not the test cluster's
    monkeypatch.setattr(local_cluster, "start_node", lambda node: pytest.fail("a node was started"))
    assert serve_cli.main(["cluster", "node-up", "edge"]) == 2
    assert "no Ray cluster answers at 127.0.0.1:1" in capsys.readouterr().err


def test_metrics_without_prometheus_says_how_to_install_it(monkeypatch):
    from deployments import local_cluster

    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match="install.sh --with-prometheus"):
        local_cluster.start_prometheus()


def test_a_profile_goes_stale_with_other_nodes_not_with_their_free_memory():
    node = {"address": "10.0.0.3", "hostname": "a", "tier": "mobile", "cpus": 1.0, "memory_gib": 15.8}
    same = [dict(node, memory_gib=15.6)]  # Ray sizes memory from what is free at each start
    assert serve_cli._node_kinds([node]) == serve_cli._node_kinds(same)
    for change in ({"cpus": 2.0}, {"tier": "edge"}, {"address": "10.0.0.9"}):
        assert serve_cli._node_kinds([node]) != serve_cli._node_kinds([dict(node, **change)])


@pytest.mark.parametrize("action", ["head-down", "head-up"])
def test_the_head_is_only_taken_down_on_a_cluster_that_can_bring_it_back(action, tmp_path, monkeypatch, capsys):
    """Without --ha the GCS's state dies with the head: killing it would end the cluster for good."""
    monkeypatch.setattr(local_cluster, "REDIS_DIR", tmp_path)
    monkeypatch.setattr(local_cluster, "stop_head", lambda: pytest.fail("the head was killed"))
    assert serve_cli.main(["cluster", action]) == 2
    err = capsys.readouterr().err
    assert "not started with --ha" in err and "dimee cluster up --ha" in err and "Traceback" not in err


def test_link_commands_need_two_namespaced_hosts(capsys):
    assert serve_cli.main(["cluster", "link-down", "mobile"]) == 2
    assert "needs the two hosts" in capsys.readouterr().err
    assert serve_cli.main(["cluster", "link-down", "mobile", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert "no namespaced host" in err and "Traceback" not in err
