"""Hop overhead of the serving path: the round trip of each hop a request can take minus the layer
compute the tier replica reports (`TierReply.compute_ms`), at p50 and p99, one text at a time.

    dimee cluster up && dimee serve artifacts/rt-polarity
    python -m load.hop_bench --artifact artifacts/rt-polarity --requests 200 --json runs/hops.json

The driver plays the ingress: it joins the cluster on the mobile node (`--node-ip`, the local
cluster's mobile node by default), computes the mobile slice in-process with the ingress's own
code (`TierRunner`) and stores the hidden state there, as the Router does; then it calls the tiers
over the same handle transport as the Router (`--transport`, gRPC by default):
  noop              a call of the edge replica's `describe`: Serve's own cost of one hop
  edge_hidden       ingress -> edge, the hidden state fetched from this process (MEDIUM samples); edge
                    keeps its own for escalation, as for an unsure sample of an escalating policy
  cloud_hidden      ingress -> cloud, the same (HARD samples)
  cloud_tokens      ingress -> cloud, token ids in (the cloud_only path)
  edge_cloud        edge's stored hidden state -> cloud (escalation)
  http_healthz      GET /healthz: client -> HTTP proxy -> ingress replica and back, no model
  http_mobile_only  POST /v1/classify with policy mobile_only (the EASY path), minus the mobile
                    compute of the same text measured in this process
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import ray
import requests
import torch
from ray import serve

from deployments import local_cluster
from deployments.schemas import TierRequest, Tokens
from deployments.tier import TierRunner
from dimee_models import artifact
from dimee_models.tiers import Tier

HOPS = ("noop", "edge_hidden", "cloud_hidden", "cloud_tokens", "edge_cloud", "http_healthz", "http_mobile_only")
WARMUP = 10


def measure(handles: dict, mobile: TierRunner, ids: list[int]) -> dict[str, tuple[float, float]]:
    """(round trip ms, compute ms) of each tier hop for one text; and the in-process mobile compute."""
    out = {}

    def call(name: str, tier: str, request: TierRequest):
        began = time.perf_counter()
        reply = handles[tier].remote(request).result(timeout_s=60)
        out[name] = ((time.perf_counter() - began) * 1000, reply.compute_ms)
        return reply

    began = time.perf_counter()
    handles["edge"].describe.remote().result(timeout_s=60)
    out["noop"] = ((time.perf_counter() - began) * 1000, 0.0)
    [local] = asyncio.run(mobile.forward([TierRequest(Tokens([ids]), keep_hidden=True)]))
    out["mobile_compute"] = (local.compute_ms, local.compute_ms)
    stored = mobile.store(local.hidden)
    edge = call("edge_hidden", "edge", TierRequest(stored, keep_hidden=True, keep_below=1.01))
    call("cloud_hidden", "cloud", TierRequest(stored))
    call("cloud_tokens", "cloud", TierRequest(Tokens([ids])))
    call("edge_cloud", "cloud", TierRequest(edge.hidden))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, required=True, help="the artifact being served (for its test texts)")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--address", default=None, help="Ray address (default: the local cluster's)")
    p.add_argument("--node-ip", default=local_cluster.node_ip(Tier.MOBILE),
                   help="join the cluster on this node, a mobile node (default: the local cluster's)")
    p.add_argument("--app", default="dimee", help="Serve application name")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--transport", choices=("grpc", "actor"), default="grpc",
                   help="Serve's gRPC handle transport (the ingress's default) or Ray actor calls")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)

    manifest = artifact.read_manifest(args.artifact)
    tokenizer = artifact.load_tokenizer(args.artifact)
    texts = artifact.load_split(args.artifact, "test", manifest).texts[: args.requests + WARMUP]
    os.environ.update(local_cluster.SERVE_ENV)  # this driver stores hidden states as the ingress does
    ray.init(address=args.address or local_cluster.address(), _node_ip_address=args.node_ip,
             logging_level=logging.WARNING, log_to_driver=False)
    handles = {t.label: serve.get_deployment_handle(t.deployment, app_name=args.app)
               .options(_by_reference=args.transport == "actor") for t in (Tier.EDGE, Tier.CLOUD)}
    torch.set_num_threads(1)  # as in the ingress replica's 0.5-CPU share
    mobile = TierRunner(str(args.artifact), Tier.MOBILE)
    session = requests.Session()
    samples = {hop: [] for hop in HOPS}
    for i, text in enumerate(texts):
        ids = tokenizer(text, truncation=True, max_length=manifest.max_length)["input_ids"]
        hops = measure(handles, mobile, ids)
        began = time.perf_counter()
        session.get(f"{args.url}/healthz", timeout=60).raise_for_status()
        hops["http_healthz"] = ((time.perf_counter() - began) * 1000, 0.0)
        began = time.perf_counter()
        session.post(f"{args.url}/v1/classify", json={"texts": [text], "mode": "mobile_only"},
                     timeout=60).raise_for_status()
        hops["http_mobile_only"] = ((time.perf_counter() - began) * 1000, hops.pop("mobile_compute")[1])
        if i >= WARMUP:
            for hop, (total, compute) in hops.items():
                samples[hop].append((total, compute))
    ray.shutdown()

    result = {}
    print(f"{'hop':>18} {'n':>5} {'total p50':>10} {'compute p50':>12} {'overhead p50':>13} {'overhead p99':>13}")
    for hop, rows in samples.items():
        total, compute = np.array(rows).T
        overhead = total - compute
        result[hop] = {"n": len(rows), "total_p50_ms": float(np.median(total)), "compute_p50_ms": float(np.median(compute)),
                       "overhead_p50_ms": float(np.percentile(overhead, 50)),
                       "overhead_p99_ms": float(np.percentile(overhead, 99))}
        r = result[hop]
        print(f"{hop:>18} {r['n']:5d} {r['total_p50_ms']:10.1f} {r['compute_p50_ms']:12.1f} "
              f"{r['overhead_p50_ms']:13.1f} {r['overhead_p99_ms']:13.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
