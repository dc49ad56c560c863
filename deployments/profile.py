"""`dimee profile`: measure a running deployment and write its cost profile
(dimee_models/profile.py), the input of the cost model in milliseconds.

    dimee up                                   # or dimee serve DIR on any cluster
    dimee profile --out profile.json           # then: dimee calibrate DIR --cost-profile profile.json

The tier calls are made from a Ray task on a mobile node, which plays the ingress: it computes the
mobile slice with the ingress's own code (`TierRunner`), stores the hidden state as the ingress does
and calls edge and cloud through Serve handles over the ingress's transport (gRPC). A hop's cost is
its round trip minus the compute the tier replica reports (`TierReply.compute_ms`). The fixed cost
of a request is measured from here, over HTTP: a mobile_only request minus its mobile compute.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import ray
import requests

from dimee_models.profile import HOPS, Profile, Stat, TierCompute
from dimee_models.tiers import Tier

log = logging.getLogger(__name__)
WARMUP = 10


@ray.remote(num_cpus=0)
def measure_tiers(artifact_dir: str, app: str, ids: list[list[int]], batch: int) -> dict:
    """On a mobile node: per text, the mobile compute, each tier's compute and each hop's overhead
    (ms); per tier, the compute per text of `batch` texts at once; hidden-state bytes per token."""
    import torch
    from ray import serve

    from deployments.schemas import TierRequest, Tokens
    from deployments.tier import TierRunner

    torch.set_num_threads(1)  # as in the ingress, a replica with under one CPU
    handles = {t: serve.get_deployment_handle(t.deployment, app_name=app).options(_by_reference=False)
               for t in (Tier.EDGE, Tier.CLOUD)}
    mobile = TierRunner(artifact_dir, Tier.MOBILE)

    def call(tier: Tier, request: TierRequest) -> tuple[float, float, object]:
        began = time.perf_counter()
        reply = handles[tier].remote(request).result(timeout_s=60)
        return (time.perf_counter() - began) * 1000, reply.compute_ms, reply

    def one(text_ids: list[list[int]]) -> dict[str, float]:
        began = time.perf_counter()
        handles[Tier.EDGE].describe.remote().result(timeout_s=60)
        out = {"noop": (time.perf_counter() - began) * 1000}
        [local] = asyncio.run(mobile.forward([TierRequest(Tokens(text_ids), keep_hidden=True)]))
        began = time.perf_counter()
        stored = mobile.store(local.hidden)
        store_ms = (time.perf_counter() - began) * 1000
        edge_rt, edge_ms, _ = call(Tier.EDGE, TierRequest(stored))
        keep_rt, keep_ms, kept = call(Tier.EDGE, TierRequest(stored, keep_hidden=True, keep_below=1.01))
        cloud_rt, cloud_from_m_ms, _ = call(Tier.CLOUD, TierRequest(stored))
        tokens_rt, cloud_ms, _ = call(Tier.CLOUD, TierRequest(Tokens(text_ids)))
        escalate_rt, escalate_ms, _ = call(Tier.CLOUD, TierRequest(kept.hidden))
        return out | {
            "mobile_ms": local.compute_ms, "edge_ms": edge_ms, "cloud_ms": cloud_ms,
            "ingress_edge": store_ms + edge_rt - edge_ms,
            "ingress_cloud": store_ms + cloud_rt - cloud_from_m_ms,
            "ingress_cloud_tokens": tokens_rt - cloud_ms,
            # edge storing its hidden state for cloud, then cloud fetching it
            "edge_cloud": (keep_rt - keep_ms) - (edge_rt - edge_ms) + escalate_rt - escalate_ms,
            "hidden_bytes_per_token": stored.nbytes / sum(len(row) for row in text_ids),
        }

    per_text = [one([row]) for row in ids]
    batched = [one(ids[i:i + batch]) for i in range(0, 3 * batch, batch)]
    return {"per_text": {k: [r[k] for r in per_text] for k in per_text[0]},
            "batch_per_text_ms": {t: statistics.median(r[f"{t}_ms"] for r in batched) / batch
                                  for t in ("mobile", "edge", "cloud")}}


def http_fixed(url: str, texts: list[str], mobile_ms: list[float], headers: dict) -> list[float]:
    """Per text, a mobile_only request's round trip minus that text's mobile compute."""
    session, out = requests.Session(), []
    for text, compute in zip(texts, mobile_ms):
        began = time.perf_counter()
        reply = session.post(f"{url}/v1/classify", json={"texts": [text], "mode": "mobile_only"}, headers=headers,
                             timeout=60)
        reply.raise_for_status()
        out.append((time.perf_counter() - began) * 1000 - compute)
    return out


def describe_nodes() -> list[dict]:
    nodes = []
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        resources = node["Resources"]
        tiers = [t.label for t in Tier if t.resource in resources]
        nodes.append({"address": node["NodeManagerAddress"], "hostname": node["NodeManagerHostname"],
                      "tier": tiers[0] if tiers else None, "cpus": resources.get("CPU", 0),
                      "memory_gib": round(resources.get("memory", 0) / 2**30, 1)})
    return sorted(nodes, key=lambda n: n["address"])


def run_profile(url: str, app: str, texts: int, batch: int, headers: dict) -> Profile:
    """Measure the deployment (Ray already initialised on its cluster) with `texts` texts of its test split."""
    from ray import serve

    from deployments.router import public_model_name
    from dimee_models import artifact

    directory = serve.get_deployment_handle(Tier.MOBILE.deployment, app_name=app).describe.remote().result(
        timeout_s=60)["artifact"]
    manifest = artifact.read_manifest(directory)
    tokenizer = artifact.load_tokenizer(directory)
    pool = artifact.load_split(directory, "test", manifest).texts
    if len(pool) < WARMUP + max(texts, 3 * batch):
        raise ValueError(f"--texts {texts} / --batch {batch}: the artifact's test split has only {len(pool)} texts")
    sample = pool[:WARMUP + max(texts, 3 * batch)]
    ids = [tokenizer(t, truncation=True, max_length=manifest.max_length)["input_ids"] for t in sample]
    on_mobile = measure_tiers.options(resources={Tier.MOBILE.resource: 0.001})
    measured = ray.get(on_mobile.remote(directory, app, ids[:WARMUP + texts], batch))
    per_text = {k: v[WARMUP:] for k, v in measured["per_text"].items()}
    fixed = http_fixed(url, sample[:WARMUP + texts], measured["per_text"]["mobile_ms"], headers)[WARMUP:]
    exits = manifest.tier_exits
    layers = {Tier.MOBILE: exits[Tier.MOBILE], Tier.EDGE: exits[Tier.EDGE] - exits[Tier.MOBILE],
              Tier.CLOUD: manifest.num_layers}
    compute = {t.label: TierCompute(layers=layers[t], one_text=Stat.of(per_text[f"{t.label}_ms"]), batch=batch,
                                    batch_per_text_ms=measured["batch_per_text_ms"][t.label]) for t in Tier}
    return Profile(
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), artifact=directory,
        model=public_model_name(manifest.backbone, manifest.dataset.name),
        exits={t.label: layer for t, layer in exits.items()} | {"cloud": manifest.num_layers},
        nodes=describe_nodes(), texts=texts, fixed=Stat.of(fixed), compute=compute,
        hops={hop: Stat.of(per_text[hop]) for hop in HOPS},
        hidden_bytes_per_token=float(np.median(per_text["hidden_bytes_per_token"])),
    )


def format_profile(profile: Profile) -> str:
    from dimee_models.profile import latency_cost_model

    lines = [f"cost profile of {profile.model} ({profile.artifact}), {profile.created}, {profile.texts} texts "
             "one at a time; ms",
             f"{'fixed per request (HTTP, proxy, ingress, tokenizer)':<52}"
             f"mean {profile.fixed.mean_ms:6.1f}  p50 {profile.fixed.p50_ms:6.1f}  p99 {profile.fixed.p99_ms:6.1f}",
             f"{'tier':<8}{'layers':>7}{'one text mean':>15}{'p50':>7}{'per layer':>11}"
             f"{f'per text at {profile.compute[Tier.MOBILE.label].batch}':>17}"]
    for tier, c in profile.compute.items():
        lines.append(f"{tier:<8}{c.layers:>7}{c.one_text.mean_ms:>15.2f}{c.one_text.p50_ms:>7.2f}"
                     f"{c.per_layer_ms:>11.2f}{c.batch_per_text_ms:>17.2f}")
    lines.append(f"{'hop (round trip - compute)':<28}{'mean':>7}{'p50':>7}{'p99':>7}")
    for hop, s in profile.hops.items():
        lines.append(f"{hop:<28}{s.mean_ms:>7.1f}{s.p50_ms:>7.1f}{s.p99_ms:>7.1f}")
    cost = latency_cost_model(profile)
    e = profile.exits
    paths = cost.path_costs(e["mobile"], e["edge"], e["cloud"])
    lines.append(f"hidden state: {profile.hidden_bytes_per_token:.0f} bytes per token")
    lines.append("predicted one-text latency per path (ms): " + ", ".join(f"{p} {v:.1f}" for p, v in paths.items()))
    return "\n".join(lines)
