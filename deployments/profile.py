"""`dimee profile`: measure a running deployment and write its cost profile
(dimee_models/profile.py), the input of the cost model in milliseconds.

    dimee up                                   # or dimee serve DIR on any cluster
    dimee profile --out profile.json           # then: dimee calibrate DIR --cost-profile profile.json

The tier calls are measured where a request's hops start: in an ingress replica (`Router.profile`
runs `measure_tiers`, below), with its own mobile slice, object store, handles
and event loop. A hop's cost is its round trip minus the compute the tier replica reports
(`TierReply.compute_ms`). The fixed cost of a request is measured from here, over HTTP: a
mobile_only request minus its mobile compute. Text by text, the two alternate, so that the
machine's drift hits both alike.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import TYPE_CHECKING

import numpy as np
import ray
import requests

from deployments import links as shaped_links
from deployments.placement import node_tier
from deployments.schemas import HiddenArrays, TierRequest, Tokens
from dimee_models.manifest import public_model_name
from dimee_models.profile import HOPS, Links, Profile, Stat, TierCompute, latency_cost_model
from dimee_models.tiers import Tier
from dimee_models.wire import FORMATS, pack

if TYPE_CHECKING:  # the CLI side of this module needs no torch
    from deployments.tier import TierRunner

WARMUP = 10


def measure_texts(url: str, ingress, texts: list[str], ids: list[list[int]], headers: dict) -> dict[str, list]:
    """Per text, in turn: a mobile_only request over HTTP, then the ingress's measurement of the tier
    calls (so that drift hits both alike); `fixed` is the request's round trip minus its mobile compute."""
    session, out = requests.Session(), {}
    for text, row in zip(texts, ids):
        began = time.perf_counter()
        reply = session.post(f"{url}/v1/classify", json={"texts": [text], "mode": "mobile_only"}, headers=headers,
                             timeout=60)
        reply.raise_for_status()
        round_trip = (time.perf_counter() - began) * 1000
        measured = ingress.profile.remote([row]).result(timeout_s=300)
        for key, value in (measured | {"fixed": round_trip - measured["mobile_ms"]}).items():
            out.setdefault(key, []).append(value)
    return out


def describe_nodes() -> list[dict]:
    nodes = []
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        resources = node["Resources"]
        nodes.append({"address": node["NodeManagerAddress"], "hostname": node["NodeManagerHostname"],
                      "tier": node_tier(node), "cpus": resources.get("CPU", 0),
                      "memory_gib": round(resources.get("memory", 0) / 2**30, 1)})
    return sorted(nodes, key=lambda n: n["address"])


def run_profile(url: str, app: str, texts: int, batch: int, headers: dict, links: Links | None = None) -> Profile:
    """Measure the deployment (Ray already initialised on its cluster) with `texts` texts of its test
    split; `links`: the network between tiers to add to the measured hops, stored with them."""
    from ray import serve

    from dimee_models import artifact

    ingress = serve.get_deployment_handle(Tier.MOBILE.deployment, app_name=app)
    directory = ingress.describe.remote().result(timeout_s=60)["artifact"]
    manifest = artifact.read_manifest(directory)
    tokenizer = artifact.load_tokenizer(directory)
    pool = artifact.load_split(directory, "test", manifest).texts
    if len(pool) < WARMUP + max(texts, 3 * batch):
        raise ValueError(f"--texts {texts} / --batch {batch}: the artifact's test split has only {len(pool)} texts")
    sample = pool[:WARMUP + max(texts, 3 * batch)]
    ids = [tokenizer(t, truncation=True, max_length=manifest.max_length)["input_ids"] for t in sample]
    per_text = {k: v[WARMUP:] for k, v in measure_texts(url, ingress, sample[:WARMUP + texts],
                                                         ids[:WARMUP + texts], headers).items()}
    batched = [ingress.profile.remote(ids[i:i + batch]).result(timeout_s=300) for i in range(0, 3 * batch, batch)]
    exits = manifest.tier_exits
    compute = {t.label: TierCompute(layers=spec.end - spec.start, one_text=Stat.of(per_text[f"{t.label}_ms"]),
                                    batch=batch,
                                    batch_per_text_ms=statistics.median(b[f"{t.label}_ms"] for b in batched) / batch)
               for t, spec in manifest.specs().items()}
    return Profile(
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), artifact=directory,
        model=public_model_name(manifest.backbone, manifest.dataset.name),
        exits={t.label: layer for t, layer in exits.items()} | {"cloud": manifest.num_layers},
        nodes=describe_nodes(), texts=texts, fixed=Stat.of(per_text["fixed"]), compute=compute,
        hops={hop: Stat.of(per_text[hop]) for hop in HOPS},
        hidden_bytes_per_token=float(np.median(per_text["hidden_bytes_per_token"])),
        tokens_per_text=float(np.mean([len(row) for row in ids[WARMUP:WARMUP + texts]])), links=links,
        wire_bytes_per_token={fmt: float(np.median(per_text[f"{fmt}_bytes_per_token"])) for fmt in FORMATS},
        measured_across=shaped_links.network(),
    )


def format_profile(profile: Profile) -> str:
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
    lines.append(f"hidden state: {profile.hidden_bytes_per_token:.0f} bytes per token"
                 + (f", {profile.tokens_per_text:.1f} tokens per text" if profile.tokens_per_text else "")
                 + (" (on the wire: " + ", ".join(f"{f} {b:.0f}" for f, b in profile.wire_bytes_per_token.items()) + ")"
                    if profile.wire_bytes_per_token else ""))
    if profile.links is not None:
        lines.append(f"links added to the hops: {profile.links.model_dump_json()}")
    if profile.measured_across is not None:
        lines.append(f"measured across the shaped links {profile.measured_across.model_dump_json()}")
    lines.append("predicted one-text latency per path (ms): " + ", ".join(f"{p} {v:.1f}" for p, v in paths.items()))
    return "\n".join(lines)


async def measure_tiers(mobile: TierRunner, handle, rows: list[list[int]]) -> dict[str, float]:
    """Run by the ingress: `rows` (token ids) as one request through every tier call it can make, each
    by the handle `handle(tier, request)` serving picks; the mobile, edge and cloud compute and each
    hop's overhead, in ms, and hidden-state bytes per token."""

    async def call(tier: Tier, request: TierRequest):
        began = time.perf_counter()
        reply = await asyncio.wait_for(handle(tier, request).remote(request), 60)
        return (time.perf_counter() - began) * 1000, reply.compute_ms, reply

    async def from_store(tier: Tier, hidden: HiddenArrays, **keep):
        """A hop as the router makes it: the hidden state stored, then the tier called at once."""
        began = time.perf_counter()
        stored = mobile.store(hidden)
        store_ms = (time.perf_counter() - began) * 1000
        round_trip, compute_ms, reply = await call(tier, TierRequest(stored, **keep))
        return store_ms + round_trip - compute_ms, compute_ms, reply, stored

    began = time.perf_counter()
    await asyncio.wait_for(handle(Tier.EDGE, TierRequest(Tokens(rows))).describe.remote(), 60)
    noop = (time.perf_counter() - began) * 1000
    [local] = await mobile.forward([TierRequest(Tokens(rows), keep_hidden=True)])
    ingress_edge, edge_ms, _, stored = await from_store(Tier.EDGE, local.hidden)
    keeping, _, kept, _ = await from_store(Tier.EDGE, local.hidden, keep_hidden=True, keep_below=1.01)
    escalate_rt, escalate_ms, _ = await call(Tier.CLOUD, TierRequest(kept.hidden))  # at once, as on escalation
    ingress_cloud, _, _, _ = await from_store(Tier.CLOUD, local.hidden)
    tokens_rt, cloud_ms, _ = await call(Tier.CLOUD, TierRequest(Tokens(rows)))
    tokens = sum(len(row) for row in rows)
    return {
        "noop": noop, "mobile_ms": local.compute_ms, "edge_ms": edge_ms, "cloud_ms": cloud_ms,
        "ingress_edge": ingress_edge, "ingress_cloud": ingress_cloud, "ingress_cloud_tokens": tokens_rt - cloud_ms,
        # edge storing its hidden state for cloud, then cloud fetching it
        "edge_cloud": keeping - ingress_edge + escalate_rt - escalate_ms,
        "hidden_bytes_per_token": stored.nbytes / tokens,
        **{f"{fmt}_bytes_per_token": pack(local.hidden.hidden, local.hidden.mask, fmt).nbytes / tokens
           for fmt in FORMATS},
    }
