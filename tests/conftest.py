"""Shared fixtures: a small real artifact, and one real three-node Ray cluster per test session."""

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml

from deployments.local_cluster import ray_cli
from deployments.schemas import ClassifyResponse, Prediction
from dimee_models import artifact
from dimee_models.cost import CostModel
from dimee_models.calibration import write_calibration
from dimee_models.policy import (POLICY_JSON, POLICY_TENSORS, CentroidPolicy, CloudOnlyPolicy, DirectCascadePolicy,
                                  Policy, load_policies)
from dimee_models.risk import RiskBound
from dimee_models.tiers import Tier
from dimee_models.train import TrainConfig, train

THREE_WAY_TEXTS = [
    "a gorgeous, witty, seductive movie.",
    "the plot is a mess and the acting is worse.",
    "it is a film.",
]
# with the `escalating` policy, edge answers some of these and hands the others on to cloud
ESCALATE_TEXTS = THREE_WAY_TEXTS + ["an utterly forgettable sequel.", "i laughed, i cried, i bought the soundtrack.",
                                    "not bad, not good, just there."]
PORT = 8011
# As root (CI), the cluster tests run on hosts that share nothing but a network (deployments/hosts.py);
# otherwise, or with DIMEE_TEST_HOSTS=loopback, on loopback addresses of this machine.
HOSTS = "netns" if os.geteuid() == 0 and os.environ.get("DIMEE_TEST_HOSTS", "netns") == "netns" else "loopback"


def dashboard() -> str:
    from deployments import local_cluster

    return f"http://{local_cluster.head_ip()}:{local_cluster.DASHBOARD_PORT}"


def tiny_facts(dataset: str, labels: list[str], exits: dict[str, int], **more) -> dict:
    """What `artifact.save` takes from its caller for a tiny test model (the dataset's size and
    fractions are not checked)."""
    return {"backbone": "tiny", "labels": labels, "task": "classification", "text_pair": False, "max_length": 16,
            "exits": exits, "dataset": {"name": dataset, "size": 0, "split_fractions": [0.6, 0.2, 0.2],
                                        "split_seed": 0},
            "training": {}, "metrics": {}, **more}


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and lose much when the 2 cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def served_artifact(tmp_path_factory) -> Path:
    """The default backbone briefly fine-tuned on rt-polarity, calibrated for real, plus a policy
    `three_way` whose centroids are the embeddings of THREE_WAY_TEXTS (mobile, edge, cloud), so a
    request with those texts is guaranteed to split across all three tiers, and a policy
    `escalating` that sends every sample to edge and escalates the less sure of ESCALATE_TEXTS;
    `no_split`, which sends every text to cloud; and `drifting`, a two-tier cascade that keeps every
    text on mobile, stored as if risk control had certified it, which the live bound finds broken
    (this barely trained model's mobile exit disagrees with its final exit often)."""
    out = tmp_path_factory.mktemp("artifact") / "rt"
    train(TrainConfig(dataset="rt-polarity", epochs=1, max_train_samples=32, batch_size=16, max_length=32,
                      splits=(0.9, 0.05, 0.05)), out)
    write_calibration(out, CostModel(), 0.3)
    manifest = artifact.read_manifest(out)
    model, tokenizer = artifact.load_full(out, manifest), artifact.load_tokenizer(out)
    with torch.inference_mode():
        enc = tokenizer(THREE_WAY_TEXTS, padding=True, return_tensors="pt")
        z = model(enc["input_ids"], enc["attention_mask"])[manifest.exits.mobile - 1].pooled.numpy()
        enc = tokenizer(ESCALATE_TEXTS, padding=True, return_tensors="pt")
        edge = model(enc["input_ids"], enc["attention_mask"])[manifest.exits.edge - 1].logits.softmax(-1)
    add_policy(out, CentroidPolicy("three_way", 2, 4, 6, {"alpha": 0.0}, {"centroids": z.astype(np.float32)}))
    conf = np.sort(edge.max(-1).values.numpy())
    gap = int(np.diff(conf).argmax())  # the threshold sits in the widest gap between edge confidences
    assert conf[gap + 1] - conf[gap] > 1e-3, conf  # served confidences agree with these to 1e-4
    escalate = load_policies(out)[0]["dimee_escalate"]
    add_policy(out, dataclasses.replace(escalate, name="escalating", thresholds={
        "mobile": 1.01, "edge": 0.0, "escalate": float(conf[gap] + conf[gap + 1]) / 2}))
    add_policy(out, CloudOnlyPolicy("no_split", 2, 4, 6, {}, {}))
    add_policy(out, DirectCascadePolicy("drifting", 2, 4, 6, {"mobile": 0.0}, {}, RiskBound(0.1, 0.3, 100, 0, 2.3, True)))
    return out


# Valid but hostile texts: separators that str.splitlines() splits at, NUL, a BOM, emoji, RTL and
# a direction override, quotes and backslashes, a very long line, duplicates.
HOSTILE_TEXTS = ["next\u0085line in the middle", "line\u2028separator here", "para\u2029graph break", "nul\x00byte",
                 "\ufeffstarts with a bom", "emoji \U0001F600\U0001F44D\U0001F3FD great", "\u05e9\u05dc\u05d5\u05dd rtl \u202eevil",
                 'tab\tand "quotes", commas and \\ backslash', "a very long line " * 1000, "dup", "dup"]


@pytest.fixture(scope="session")
def hostile_artifact(tmp_path_factory) -> Path:
    """A tiny model trained and calibrated from a user CSV full of hostile texts, written as Excel
    would (BOM, CRLF) with an empty row, as a user would bring it."""
    import csv

    folder = tmp_path_factory.mktemp("hostile")
    rows = [(text, ("pos", "neg")[(i + copy) % 2]) for copy in range(3) for i, text in enumerate(HOSTILE_TEXTS)]
    rows += [(f"an ordinary review number {i}, {'fine' if i % 2 else 'dull'}.", ("pos", "neg")[i % 2]) for i in range(15)]
    with (folder / "reviews.csv").open("w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f)  # CRLF line ends, fields quoted where needed
        writer.writerow(["review", "sentiment"])
        writer.writerows(rows[:20])
        f.write("\r\n")  # an empty row
        writer.writerows(rows[20:])
    out = folder / "artifact"
    train(TrainConfig(dataset=f"csv:{folder / 'reviews.csv'}", text_column="review", label_column="sentiment",
                      epochs=1, max_train_samples=32, batch_size=16, max_length=32, splits=(0.5, 0.25, 0.25)), out)
    write_calibration(out, CostModel(), 0.3)
    return out


def add_policy(directory: Path, policy: Policy) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(directory / POLICY_TENSORS)
    tensors.update({f"{policy.name}/{k}": v for k, v in policy.tensors.items()})
    save_file(tensors, directory / POLICY_TENSORS)
    doc = json.loads((directory / POLICY_JSON).read_text())
    doc["policies"][policy.name] = policy.to_json()
    (directory / POLICY_JSON).write_text(json.dumps(doc))
    artifact.write_manifest(directory, artifact.read_manifest(directory, verify=False))
    assert policy.name in load_policies(directory)[0]


SHADOW = {"shadow_rate": 1.0, "on_drift": "alarm"}


def serve_config(directory: Path, replicas: dict[str, int], policy: str | None = "three_way") -> dict:
    doc = yaml.safe_load((Path(__file__).parents[1] / "deployments" / "serve_config.yaml").read_text())
    app = doc["applications"][0]
    # A 20 ms batch wait makes concurrent test requests merge for sure (with the default 0 s wait,
    # whether they do depends on event-loop timing); a lone request pays it only on mobile and edge.
    app["args"].update({"artifact": str(directory), "policy": policy,
                        "mobile": {"batch_wait_timeout_s": 0.02}, "edge": {"batch_wait_timeout_s": 0.02}})
    # Every routed sample shadow-checked, so every test runs with shadow checks at their most; drift
    # only reported, since tightening would change the answers tests expect of this barely trained model.
    from deployments import local_cluster

    doc["http_options"] = local_cluster.proxy_http_options()
    router = next(d for d in app["deployments"] if d["name"] == "Router")
    router["user_config"].update(SHADOW)
    for entry in app["deployments"]:
        tier = Tier.of_deployment(entry["name"])
        if tier.label in replicas:
            entry.pop("autoscaling_config", None)
            entry["num_replicas"] = replicas[tier.label]
    return doc


def deploy(config: dict, tmp_path: Path) -> None:
    """`serve deploy` a config (the declarative path users take) and wait until it is RUNNING."""
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run([ray_cli("serve"), "deploy", "--address", dashboard(), str(path)], check=True, timeout=120,
                   capture_output=True)
    wait_running(300)


def wait_running(seconds: float) -> float:
    """Seconds until Serve's controller reports the application RUNNING."""
    began, status = time.monotonic(), ""
    while time.monotonic() - began < seconds:
        try:
            status = subprocess.run([ray_cli("serve"), "status", "--address", dashboard()], capture_output=True,
                                    text=True, timeout=60).stdout
        except subprocess.TimeoutExpired:  # a head coming back
            continue
        app = (yaml.safe_load(status) or {}).get("applications", {}).get("dimee", {})
        if app.get("status") == "RUNNING":
            return time.monotonic() - began
        if app.get("status") == "DEPLOY_FAILED":
            raise RuntimeError(f"deploy failed: {app.get('message')}")
        time.sleep(1)
    raise TimeoutError(f"application not RUNNING after {seconds} s: {status}")


@pytest.fixture(scope="module")
def cluster(served_artifact, tmp_path_factory):
    """A real local cluster (a head, then mobile, edge and cloud nodes; see HOSTS), the app deployed
    from the Serve config file; torn down after the module (other modules start Ray clusters of their
    own). On namespaced hosts this process joins the head's network, as a driver must."""
    import ray

    from deployments import hosts, local_cluster

    local_cluster.down()
    local_cluster.up(ha=bool(shutil.which("redis-server")), netns=HOSTS == "netns")  # `ha`: the head-loss test
    if HOSTS == "netns":
        hosts.join("head")
    try:
        if shutil.which("prometheus"):  # scraping from the start, so that it sees what every test does
            local_cluster.start_prometheus()
        ray.init(address=local_cluster.address(), logging_level="ERROR")
        deploy(serve_config(served_artifact, {"mobile": 1, "edge": 1, "cloud": 1}), tmp_path_factory.mktemp("cfg"))
        url = local_cluster.start_front(port=PORT)  # the front door, as `dimee serve` starts it
        wait_http(url + "/healthz")
        yield url
    finally:
        from ray.serve.context import _set_global_client

        _set_global_client(None)  # Serve caches its controller's handle per process: the next module's cluster has another
        ray.shutdown()
        hosts.join(None)
        local_cluster.down()


@pytest.fixture(scope="module")
def ha(cluster) -> None:
    """The cluster fixture's head keeps the GCS's state in Redis: it can be lost and come back."""
    from deployments import local_cluster

    if not (local_cluster.REDIS_DIR / "namespace").is_file():
        missing = "redis-server is not installed: ./scripts/install.sh --with-redis"
        if os.environ.get("CI"):  # .ci/run installs it
            pytest.fail(missing)
        pytest.skip(missing)


@pytest.fixture(scope="module")
def prometheus(cluster) -> str:
    """The Prometheus server the cluster fixture started, scraping every node."""
    from deployments import local_cluster

    if not shutil.which("prometheus"):
        missing = "Prometheus is not installed: ./scripts/install.sh --with-prometheus"
        if os.environ.get("CI"):  # .ci/run installs it: there, a missing binary is a failure, not a skip
            pytest.fail(missing)
        pytest.skip(missing)
    return f"http://127.0.0.1:{local_cluster.PROMETHEUS_PORT}"


class ClassifyStandIn(BaseHTTPRequestHandler):
    """/v1/classify answering as the Router does, by the first text: a prediction (`Prediction`) per
    text, all normal, or the first by fallback, degraded or both; 503 with Retry-After (at capacity),
    a 503 without (not a refusal the service chose), 500, one prediction too few, or no answer for 1 s."""

    def do_POST(self):
        texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["texts"]
        first, status, headers = texts[0], 200, {"Content-Type": "application/json", "x-request-id": "r1"}
        if first == "slow":
            time.sleep(1)  # the client has given up by now
            return
        if first in ("busy", "unavailable", "broken"):
            status = 500 if first == "broken" else 503
            headers = {"Retry-After": "2"} if first == "busy" else {}
        flags = {"fallback": {"fallback": True}, "degraded": {"degraded": True},
                 "both": {"fallback": True, "degraded": True}}.get(first, {})
        normal = Prediction(label="positive", label_id=1, confidence=0.9, tier="edge", exit_layer=4, cost=0.6)
        predictions = [normal.model_copy(update=flags)] + [normal] * (len(texts) - 1 - (first == "short"))
        body = (ClassifyResponse(predictions=predictions, model="m").model_dump_json() if status == 200
                else json.dumps({"detail": "no room now"})).encode()
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    """The URL of a ClassifyStandIn."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), ClassifyStandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def wait_http(url: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


@contextlib.contextmanager
def moto_server(host: str):
    """moto's standalone S3-compatible server on `host`; yields its host:port."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield f"{host}:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def upload(directory: Path, bucket_uri: str) -> None:
    """What a user does with `aws s3 sync DIR s3://...`, in a process of its own, as theirs: the
    S3 client's threads keep the network they were started on, and a test may be on a host's."""
    code = ("import sys; from pyarrow import fs; s3, path = fs.FileSystem.from_uri(sys.argv[2]); "
            "s3.create_dir(path.split('/')[0]); fs.copy_files(sys.argv[1], path, destination_filesystem=s3)")
    subprocess.run([sys.executable, "-c", code, str(directory), bucket_uri + "&allow_bucket_creation=true"],
                   check=True, capture_output=True, timeout=120)
