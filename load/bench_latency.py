"""Single-text latency per answering tier: end-to-end HTTP latency per mode, the tier layers alone
(in-process, 1 torch thread as in a 0.5-CPU replica), overhead per Serve handle hop, memory per replica.
The end-to-end time is also split per request along Serve's access logs (router and tier replicas).

Reproduce (against a running deployment; --json appends this run to OUT's {"runs": [...]}):
    dimee cluster up && dimee serve artifacts/rt-polarity
    python -m load.bench_latency --artifact artifacts/rt-polarity --requests 200 --json docs/results/latency.json
    dimee cluster down
"""

import argparse
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import psutil
import requests
import torch

from deployments import local_cluster
from deployments.schemas import HiddenWire, TierRequest, Tokens
from deployments.tier import TierRunner
from dimee_models import artifact
from dimee_models.manifest import Manifest
from dimee_models.tiers import TIER_NAMES, Tier
from load.client import DEFAULT_URL, INFO, post, request_body

MODES, WARMUP, REPS = ("mobile_only", "edge_only", "cloud_only", "dimee"), 10, 3
PARTS = ("tokenize", "mobile", "edge", "cloud_full", "cloud_from_m", "cloud_from_e")
PCTS = ("p50_ms", "p90_ms", "p99_ms")
SERVE_LOGS = Path("/tmp/ray/session_latest/logs/serve")  # this machine's Serve access logs
# (mode, answering tier) -> (compute parts on the path, Serve hops incl. proxy->ingress). Mobile runs
# inside the ingress, so a mobile answer takes one hop, every other answer two, an escalated one three.
PATHS = {("mobile_only", "mobile"): (("tokenize", "mobile"), 1), ("edge_only", "edge"): (("tokenize", "mobile", "edge"), 2),
         ("cloud_only", "cloud"): (("tokenize", "cloud_full"), 2), ("dimee", "mobile"): (("tokenize", "mobile"), 1),
         ("dimee", "edge"): (("tokenize", "mobile", "edge"), 2), ("dimee", "cloud"): (("tokenize", "mobile", "cloud_from_m"), 2),
         ("dimee", "escalated"): (("tokenize", "mobile", "edge", "cloud_from_e"), 3)}


def http_latency(url: str, texts: list[str], warmup: list[str]) -> dict[tuple, list[tuple]]:
    """(mode, answering tier) -> [(text index, ms, request id)]; sequential, one text per request. Every
    text goes to all modes in turn (rotated order), so the machine's drift hits every mode alike."""
    session, groups = requests.Session(), {}
    for i, text in [(-1, t) for t in warmup] + list(enumerate(texts)):
        for mode in MODES[i % 4:] + MODES[:i % 4]:
            reply = post(session, url, request_body([text], mode)).raise_unless_answered()
            if i >= 0:
                answer = reply.predictions[0]
                tier = "escalated" if answer["escalated"] else answer["tier"]
                groups.setdefault((mode, tier), []).append((i, reply.latency_ms, reply.headers["x-request-id"]))
    return groups


def layer_compute(directory: Path, manifest: Manifest, texts: list[str]) -> dict[str, np.ndarray]:
    """Per text (median of REPS), ms of PARTS: the router's tokenizer call, then each tier's forward
    by the tiers' own code (`TierRunner`, without Ray), one torch thread as in a 0.5-CPU replica."""
    torch.set_num_threads(1)
    tok, runners = artifact.load_tokenizer(directory), {t: TierRunner(str(directory), t) for t in Tier}

    def tier(t: Tier, given: Tokens | HiddenWire) -> HiddenWire:
        start = 0 if isinstance(given, Tokens) else given.layer
        [reply] = runners[t]._forward([TierRequest(given, keep_hidden=True)], [given], start, 1)
        return runners[t].store(reply.hidden)  # one text's travels inline: packed, not put

    def once(text: str) -> list[float]:
        t = [time.perf_counter()]
        ids = Tokens(tok([text], None, truncation=True, max_length=manifest.max_length)["input_ids"])
        t.append(time.perf_counter())
        hidden = tier(Tier.MOBILE, ids)
        t.append(time.perf_counter())
        edge = tier(Tier.EDGE, hidden)
        t.append(time.perf_counter())
        for given in (ids, hidden, edge):
            tier(Tier.CLOUD, given)
            t.append(time.perf_counter())
        return list(np.diff(t) * 1000)

    for text in texts[:WARMUP]:
        once(text)
    per_text = np.array([np.median([once(text) for _ in range(REPS)], axis=0) for text in texts])
    return dict(zip(PARTS, per_text.T))


def serve_log_times(log_dir: Path) -> dict[str, dict[str, float]]:
    """request id -> {router, mobile, edge, cloud: ms spent in that replica}, from Serve's access logs."""
    line, times = re.compile(r" dimee_(Router|\w+Tier) \S+ (\S+) -- \S+ \S+ \S+ ([\d.]+)ms$"), {}
    for path in log_dir.glob("*.log"):
        for hit in filter(None, map(line.search, path.read_text(errors="replace").splitlines())):
            part = "router" if hit[1] == "Router" else Tier.of_deployment(hit[1]).label
            times.setdefault(hit[2], {})[part] = float(hit[3])
    return times


def replica_memory() -> list[dict]:
    """RSS and USS of every Serve actor (replicas, proxy, controller) of the local cluster."""
    import ray
    from ray.util.state import list_actors

    local_cluster.connect()
    try:
        ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        actors = [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
                  if a.class_name.startswith("ServeReplica") or a.class_name in ("ProxyActor", "ServeController")]
        return sorted(({"actor": a.class_name.split(":")[-1], "pid": a.pid, "node": ips.get(a.node_id),
                        **{f"{k}_mib": round(getattr(psutil.Process(a.pid).memory_full_info(), k) / 2**20, 1)
                           for k in ("rss", "uss")}} for a in actors), key=lambda r: r["actor"])
    finally:
        ray.shutdown()


def summarize(groups: dict, compute: dict[str, np.ndarray], logs: dict[str, dict[str, float]],
              paths: dict = PATHS) -> list[dict]:
    """Percentiles per (mode, tier); overhead = e2e p50 - summed compute p50 of the path; and medians of
    the per-request split: outside the router (client, HTTP, proxy, proxy->router hop), in the router
    but not in a tier call (tokenize, mobile layers, policy, router->tier hops), in a tier call but not
    computing."""
    rows = []
    for (mode, answered), (parts, hops) in ((k, v) for k, v in paths.items() if k in groups):
        idx, ms, ids = (np.array(c) for c in zip(*groups[mode, answered]))
        row = {"mode": mode, "tier": answered, "n": len(ms), **{k: float(np.percentile(ms, int(k[1:3]))) for k in PCTS}}
        path_ms = sum(float(np.median(compute[p][idx])) for p in parts)
        row |= {"compute_path": list(parts), "compute_p50_ms": path_ms, "overhead_ms": row["p50_ms"] - path_ms,
                "hops": hops, "per_hop_ms": (row["p50_ms"] - path_ms) / hops}
        called = [p for p in parts[1:] if p != "mobile"]  # parts computed in a tier call; mobile is in the router
        tiers = [p.split("_")[0] for p in called]
        seen = [k for k, r in enumerate(ids) if {"router", *tiers} <= logs.get(r, {}).keys()]
        if seen:
            log = [logs[r] for r in ids[seen]]
            split = {"outside_router": ms[seen] - [t["router"] for t in log],
                     "router_and_tier_hops": [t["router"] - sum(t[x] for x in tiers) for t in log],
                     **{f"{x}_call_minus_compute": [t[x] for t in log] - compute[p][idx[seen]] for x, p in zip(tiers, called)}}
            row["split_p50_ms"] = {k: float(np.median(v)) for k, v in split.items()} | {"requests": len(seen)}
        rows.append(row)
    return rows


def table(run: dict) -> str:
    out = [f"{'mode':<12}{'tier':<7}{'n':>4}{'p50':>7}{'p90':>7}{'p99':>7}{'compute':>8}{'overhd':>7}{'hops':>5}"
           f"{'/hop':>6}  | p50 split: outside-router  router+hops  tier call - compute"]
    for r in run["latency"]:
        s = r.get("split_p50_ms", {})
        calls = " ".join(f"{k.split('_')[0]} {v:.1f}" for k, v in s.items() if k.endswith("compute"))
        out.append(f"{r['mode']:<12}{r['tier']:<7}{r['n']:>4}" + "".join(f"{r[k]:>7.1f}" for k in PCTS)
                   + f"{r['compute_p50_ms']:>8.1f}{r['overhead_ms']:>7.1f}{r['hops']:>5}{r['per_hop_ms']:>6.1f}  | "
                   + (f"{s['outside_router']:>14.1f}{s['router_and_tier_hops']:>13.1f}  {calls}" if s else "no logs"))
    out.append("mean per mode (ms, every answer): "
               + ", ".join(f"{m} {v:.1f}" for m, v in run["mode_mean_ms"].items()))
    out.append("compute p50 (ms, 1 thread, all texts): " + ", ".join(f"{p} {v:.2f}" for p, v in run["compute_p50_ms"].items()))
    out.append(f"{'actor':<16}{'node':<11}{'RSS MiB':>9}{'USS MiB':>9}{'params MiB':>11}")
    for r in run["memory"]:
        tier = Tier.of_deployment(r["actor"])
        nbytes = run["parameter_bytes"].get(tier.label) if tier else None
        out.append(f"{r['actor']:<16}{r['node'] or '?':<11}{r['rss_mib']:>9.1f}{r['uss_mib']:>9.1f}"
                   + (f"{nbytes / 2**20:>11.1f}" if nbytes else f"{'-':>11}"))
    return "\n".join(out + [f"mobile parameter bytes = {run['mobile_share_of_full']:.1%} of the full model's"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=DEFAULT_URL)
    ap.add_argument("--artifact", type=Path, default=Path("artifacts/rt-polarity"))
    ap.add_argument("--requests", type=int, default=200, help=f"requests per mode (after {WARMUP} warm-up)")
    ap.add_argument("--json", type=Path, default=None, help='append this run to OUT ({"runs": [...]})')
    args = ap.parse_args()
    manifest = artifact.read_manifest(args.artifact)
    pool = artifact.load_split(args.artifact, "test", manifest).texts
    sample = random.Random(0).sample(pool, args.requests + WARMUP)
    texts, warmup = sample[:args.requests], sample[args.requests:]

    groups = http_latency(args.url.rstrip("/"), texts, warmup)
    paths = PATHS
    if requests.get(f"{args.url.rstrip('/')}{INFO}", timeout=60).json()["policy"]["kind"] == "cloud_only":
        paths = PATHS | {("dimee", "cloud"): PATHS["cloud_only", "cloud"]}  # a policy that does not split
    compute = layer_compute(args.artifact, manifest, texts)
    memory = replica_memory()  # also gives the access logs time to be flushed
    params = {t: manifest.tiers[t].parameter_bytes for t in TIER_NAMES}
    run = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "url": args.url, "artifact": str(args.artifact),
           "requests_per_mode": args.requests, "warmup_per_mode": WARMUP, "cpus": psutil.cpu_count(),
           "latency": summarize(groups, compute, serve_log_times(SERVE_LOGS), paths),
           "mode_mean_ms": {m: float(np.mean([ms for (q, _), rows in groups.items() if q == m
                                              for _, ms, _ in rows])) for m in MODES},
           "compute_p50_ms": {p: float(np.median(v)) for p, v in compute.items()}, "memory": memory,
           "parameter_bytes": params, "mobile_share_of_full": params["mobile"] / params["cloud"]}
    print(table(run))
    if args.json:
        runs = json.loads(args.json.read_text())["runs"] if args.json.is_file() else []
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": [*runs, run]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
