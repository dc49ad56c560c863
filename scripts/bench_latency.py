"""Single-text latency per answering tier: end-to-end HTTP latency per policy, the tier layers
alone (in-process, 1 torch thread like a 0.5-CPU replica), the overhead per Serve handle hop,
and the memory of every Serve replica.

Reproduce (against a running deployment; --json appends this run to OUT's {"runs": [...]}):
    dimee cluster up && dimee serve artifacts/rt-polarity
    python scripts/bench_latency.py --artifact artifacts/rt-polarity --requests 200 \
        --json docs/results/latency.json
    dimee cluster down
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import psutil
import requests
import torch

from dimee_models import artifact
from dimee_models.model import HiddenState

POLICIES = ("mobile_only", "edge_only", "cloud_only", "dimee")
WARMUP, REPS = 10, 3
# (policy, answering tier) -> (compute parts on the path, Serve handle hops incl. proxy->router)
PATHS = {
    ("mobile_only", "mobile"): (("tokenize", "mobile"), 2),
    ("edge_only", "edge"): (("tokenize", "mobile", "edge"), 3),
    ("cloud_only", "cloud"): (("tokenize", "cloud_full"), 2),
    ("dimee", "mobile"): (("tokenize", "mobile"), 2),
    ("dimee", "edge"): (("tokenize", "mobile", "edge"), 3),
    ("dimee", "cloud"): (("tokenize", "mobile", "cloud_from_m"), 3),
}
PARTS = ("tokenize", "mobile", "edge", "cloud_full", "cloud_from_m")


def http_latency(url: str, texts: list[str], warmup: list[str]) -> dict[tuple, list[tuple[int, float]]]:
    """(policy, answering tier) -> [(text index, ms)], sequential, one text per request."""
    session, groups = requests.Session(), {}
    for policy in POLICIES:
        for i, text in [(-1, t) for t in warmup] + list(enumerate(texts)):
            began = time.perf_counter()
            reply = session.post(f"{url}/v1/classify", json={"texts": [text], "policy": policy}, timeout=60)
            ms = (time.perf_counter() - began) * 1000
            reply.raise_for_status()
            if i >= 0:
                groups.setdefault((policy, reply.json()["predictions"][0]["tier"]), []).append((i, ms))
    return groups


def layer_compute(directory: Path, manifest: dict, texts: list[str]) -> dict[str, np.ndarray]:
    """Per text (median of REPS): ms of the tokenizer and of each tier's forward as TierModel._forward runs it."""
    torch.set_num_threads(1)
    tok = artifact.load_tokenizer(directory)
    mods = {t: artifact.load_tier(directory, t, manifest) for t in artifact.TIERS}
    m, e, n = manifest["exits"]["mobile"], manifest["exits"]["edge"], manifest["num_layers"]

    def head(model, state: HiddenState, end: int) -> HiddenState:
        state = model.run_layers(state, end)
        model.exit(state).logits.softmax(-1).numpy()
        return state

    def once(text: str) -> dict[str, float]:
        clock, ms = [time.perf_counter()], {}

        def lap(part):
            clock.append(time.perf_counter())
            ms[part] = (clock[-1] - clock[-2]) * 1000

        enc = tok([text], None, truncation=True, max_length=manifest["max_length"])
        lap("tokenize")
        ids = torch.as_tensor(np.asarray(enc["input_ids"], dtype=np.int64))
        types = torch.as_tensor(np.asarray(enc["token_type_ids"])) if "token_type_ids" in enc else None
        mobile = head(mods["mobile"], mods["mobile"].embed(ids, torch.ones_like(ids), types), m)
        hidden, mask = mobile.hidden.numpy(), mobile.attention_mask.numpy()
        lap("mobile")
        head(mods["edge"], HiddenState(torch.from_numpy(hidden.copy()), torch.from_numpy(mask.copy()), m), e)
        lap("edge")
        head(mods["cloud"], mods["cloud"].embed(ids, torch.ones_like(ids), types), n)
        lap("cloud_full")
        head(mods["cloud"], HiddenState(torch.from_numpy(hidden.copy()), torch.from_numpy(mask.copy()), m), n)
        lap("cloud_from_m")
        return ms

    with torch.inference_mode():
        for text in texts[:WARMUP]:
            once(text)
        runs = [[once(text) for _ in range(REPS)] for text in texts]
    return {p: np.array([np.median([r[p] for r in reps]) for reps in runs]) for p in PARTS}


def replica_memory() -> list[dict]:
    """RSS / USS of every Serve actor (replicas, proxy, controller) on the local cluster."""
    import ray
    from ray.util.state import list_actors

    ray.init(address="127.0.0.2:6390", logging_level="ERROR", log_to_driver=False)
    try:
        ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        rows = []
        for actor in list_actors(filters=[("state", "=", "ALIVE")], detail=True):
            if actor.class_name.startswith("ServeReplica") or actor.class_name in ("ProxyActor", "ServeController"):
                info = psutil.Process(actor.pid).memory_full_info()
                rows.append({"actor": actor.class_name.split(":")[-1], "pid": actor.pid, "node": ips.get(actor.node_id),
                             "rss_mib": round(info.rss / 2**20, 1), "uss_mib": round(info.uss / 2**20, 1)})
        return sorted(rows, key=lambda r: r["actor"])
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--artifact", type=Path, default=Path("artifacts/rt-polarity"))
    ap.add_argument("--requests", type=int, default=200, help="requests per policy (after %d warm-up)" % WARMUP)
    ap.add_argument("--json", type=Path, default=None, help="append this run to OUT ({\"runs\": [...]})")
    args = ap.parse_args()
    manifest = artifact.read_manifest(args.artifact)
    pool = [json.loads(line)["text"] for line in (args.artifact / "splits/test.jsonl").read_text().splitlines() if line]
    sample = random.Random(0).sample(pool, args.requests + WARMUP)
    texts, warmup = sample[:args.requests], sample[args.requests:]

    groups = http_latency(args.url.rstrip("/"), texts, warmup)
    compute = layer_compute(args.artifact, manifest, texts)
    memory = replica_memory()

    latency = []
    for key, (parts, hops) in PATHS.items():
        if key not in groups:
            continue
        idx, ms = map(np.array, zip(*groups[key]))
        path_ms = sum(float(np.median(compute[p][idx])) for p in parts)
        p50 = float(np.median(ms))
        latency.append({"policy": key[0], "tier": key[1], "n": len(ms), "p50_ms": p50,
                        "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
                        "compute_path": list(parts), "compute_p50_ms": path_ms, "overhead_ms": p50 - path_ms,
                        "hops": hops, "per_hop_ms": (p50 - path_ms) / hops})
    params = {t: manifest["tiers"][t]["parameter_bytes"] for t in artifact.TIERS}
    run = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "url": args.url, "artifact": str(args.artifact),
           "requests_per_policy": args.requests, "warmup_per_policy": WARMUP, "cpus": psutil.cpu_count(),
           "torch_threads": 1, "latency": latency,
           "compute_p50_ms_all_texts": {p: float(np.median(v)) for p, v in compute.items()},
           "memory": memory, "parameter_bytes": params, "mobile_share_of_full": params["mobile"] / params["cloud"]}

    print(f"{'policy':<12}{'tier':<8}{'n':>5}{'p50':>8}{'p90':>8}{'p99':>8}{'compute':>9}{'overhead':>9}{'hops':>5}{'/hop':>7}")
    for r in latency:
        print(f"{r['policy']:<12}{r['tier']:<8}{r['n']:>5}{r['p50_ms']:>8.1f}{r['p90_ms']:>8.1f}{r['p99_ms']:>8.1f}"
              f"{r['compute_p50_ms']:>9.1f}{r['overhead_ms']:>9.1f}{r['hops']:>5}{r['per_hop_ms']:>7.1f}")
    print("compute p50 (ms, 1 thread, all texts): "
          + ", ".join(f"{p} {v:.2f}" for p, v in run["compute_p50_ms_all_texts"].items()))
    print(f"{'actor':<16}{'node':<11}{'RSS MiB':>9}{'USS MiB':>9}{'params MiB':>11}")
    for r in memory:
        tier = r["actor"].removesuffix("Tier").lower()
        pm = f"{params[tier] / 2**20:.1f}" if tier in params else "-"
        print(f"{r['actor']:<16}{r['node'] or '?':<11}{r['rss_mib']:>9.1f}{r['uss_mib']:>9.1f}{pm:>11}")
    print(f"mobile parameter bytes = {run['mobile_share_of_full']:.1%} of the full model's")
    if args.json:
        doc = json.loads(args.json.read_text()) if args.json.is_file() else {"runs": []}
        doc["runs"].append(run)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
