"""Real links, side by side in one run: for each network (the loopback cluster; namespaced hosts on
their bridge; the same hosts with shaped `lan` and `mobile` links), `dimee up` on a fresh copy of
the artifact (it profiles the cluster and tunes the tier boundaries and thresholds to it), then:

  - each shaped link measured (a small message's round trip, a bulk transfer's rate) against its figures;
  - the profile's hops against the bridge's profile plus what `--links` adds (`predicted_hops`);
  - served mean one-text latency of the tuned default and of cloud_only (texts of the test split,
    alternating, over HTTP through the mobile host's front door) against what the tuned cost model
    predicts for the test split (`dimee evaluate`, with the cost model the default was tuned for);
  - what crosses the links (the wire tuning chose), the bytes per forwarded text it sends against
    float32's, and the default's guarantee over 50 redraws (`dimee evaluate --resamples 50`).

    python -m load.links_bench --artifact artifacts/default --out docs/results/links/bench.json

Root only (namespaced hosts). Each network takes ~5 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch

from deployments import links
from dimee_models import artifact
from dimee_models.artifact import CLUSTER_PROFILE
from dimee_models.policy import load_policies
from dimee_models.evaluate import served_split
from dimee_models.profile import HOPS, LINK_PRESETS, TOKEN_ID_BYTES, Profile, predicted_hops, read_profile
from dimee_models.tiers import Tier
from dimee_models.wire import pack
from load.client import emit, post, request_body

NETWORKS = ("loopback", "bridge", "lan", "mobile")
LINKED = {"mobile_edge": ("mobile", "edge"), "mobile_cloud": ("mobile", "cloud"), "edge_cloud": ("edge", "cloud")}
WARMUP = 10


def dimee(*args: str, timeout: float = 1800) -> str:
    result = subprocess.run([sys.executable, "-m", "deployments.cli", *args], capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"dimee {' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result.stdout


def served_latency(url: str, texts: list[str]) -> dict[str, dict]:
    """Mean and p50 ms per mode, one text per request; each text to both modes, in turn."""
    session, ms = requests.Session(), {"dimee": [], "cloud_only": []}
    for i, text in enumerate(texts):
        for mode in (("dimee", "cloud_only") if i % 2 else ("cloud_only", "dimee")):
            reply = post(session, url, request_body([text], mode)).raise_unless_answered()
            if i >= WARMUP:
                ms[mode].append(reply.latency_ms)
    return {mode: {"mean_ms": float(np.mean(v)), "p50_ms": float(np.median(v)), "n": len(v)} for mode, v in ms.items()}


def predicted_latency(copy: Path) -> dict:
    """The tuned default's and cloud_only's mean ms on the test split, from the cost model it was tuned
    for (the cluster's profile, its wire's bytes), and its guarantee over 50 redraws."""
    out = copy / "evaluate.json"
    dimee("evaluate", str(copy), "--resamples", "50", "--json", str(out))
    result, default = json.loads(out.read_text()), load_policies(copy)[1].default
    methods, held = result["methods"], result["resampled"]["served_default"]
    return {"policy": default, "dimee_mean_ms": methods[default]["latency_ms"]["mean"],
            "cloud_only_mean_ms": methods["cloud_only"]["latency_ms"]["mean"],
            "tier_fraction": methods[default]["tier_fraction"],
            "resampled": {"k": held["k"], "within_budget_share": held["within_budget_share"]}}


def forwarded_bytes(copy: Path, per_request: int) -> dict:
    """Bytes per text the tuned default sends past mobile on the test split, in requests of
    `per_request` texts (one send per tier a request reaches), as `wire.pack` packs the mobile hidden
    states of those rows (int8 is deflated, so its bytes depend on the values): over the tuned wire,
    as float32, and as float32 was sent before wires (padded to the longest row sent, with an int64
    mask)."""
    manifest = artifact.read_manifest(copy)
    policies, doc = load_policies(copy)
    policy, wire = policies[doc.default], doc.wire
    out = served_split(copy, "test", manifest, wire)
    tiers, _ = policy.assign(out.z, out.probs(out.mobile_exit), out.probs(out.edge_exit))
    ds = artifact.load_split(copy, "test", manifest)
    tokens = artifact.load_tokenizer(copy)(ds.texts, ds.text_pairs, truncation=True,
                                           max_length=manifest.max_length)["input_ids"]
    mobile = artifact.load_tier(copy, Tier.MOBILE, manifest)
    sent = {"wire": 0, "float32": 0, "float32_padded": 0}
    texts = 0
    for lo in range(0, len(tiers), per_request):
        for tier in (Tier.EDGE, Tier.CLOUD):
            rows = [r for r in range(lo, min(lo + per_request, len(tiers))) if tiers[r] == tier]
            if not rows:
                continue
            lengths = [len(tokens[r]) for r in rows]
            mask = (np.arange(max(lengths))[None] < np.array(lengths)[:, None]).astype(np.int64)
            ids = np.array([tokens[r] + [0] * (mask.shape[1] - len(tokens[r])) for r in rows])
            with torch.inference_mode():
                state = mobile.run_layers(mobile.embed(torch.from_numpy(ids), torch.from_numpy(mask)),
                                          manifest.exits.mobile)
            hidden = state.hidden.numpy()
            texts += len(rows)
            sent["float32"] += pack(hidden, mask, "float32").nbytes
            sent["float32_padded"] += hidden.nbytes + mask.nbytes
            sent["wire"] += (sum(lengths) * TOKEN_ID_BYTES if tier is Tier.CLOUD and wire.carrier == "tokens"
                             else pack(hidden, mask, wire.format).nbytes)
    per_text = {k: v / max(texts, 1) for k, v in sent.items()}
    return {"texts_forwarded": texts, "bytes_per_text": per_text,
            "wire_over_float32": per_text["wire"] / max(per_text["float32"], 1),
            "wire_over_float32_padded": per_text["wire"] / max(per_text["float32_padded"], 1)}


def one_network(net: str, source: Path, work: Path, texts: list[str]) -> dict:
    copy = work / net
    shutil.copytree(source, copy)
    (copy / CLUSTER_PROFILE).unlink(missing_ok=True)  # measured anew, on this network
    hosts_flags = [] if net == "loopback" else ["--hosts", "netns"] + ([] if net == "bridge" else ["--links", net])
    dimee("down")
    began = time.monotonic()
    try:
        dimee("up", "--artifact", str(copy), *hosts_flags)
        up_s = time.monotonic() - began
        result = {"network": net, "dimee_up_s": round(up_s, 1)}
        if net in LINK_PRESETS:
            result["links"] = {name: {"configured": getattr(LINK_PRESETS[net], name).model_dump(),
                                      "measured": links.check(*pair)} for name, pair in LINKED.items()}
        url = "http://127.0.0.1:8000" if net == "loopback" else "http://10.77.0.3:8000"
        result["served"] = served_latency(url, texts)
    finally:
        dimee("down")
    profile = read_profile(copy / CLUSTER_PROFILE)
    doc = load_policies(copy)[1]
    served = doc.policies[doc.default]
    result |= {"profile": json.loads(profile.model_dump_json()), "predicted": predicted_latency(copy),
               "exits": served["exits"], "thresholds": served["thresholds"], "wire": doc.wire.model_dump(),
               "wire_choice": doc.wire_choice,
               "bytes": {str(k): forwarded_bytes(copy, k) for k in (1, 16)}}
    result["served"]["ratio"] = result["served"]["dimee"]["mean_ms"] / result["served"]["cloud_only"]["mean_ms"]
    p = result["predicted"]
    p["ratio"] = p["dimee_mean_ms"] / p["cloud_only_mean_ms"]
    return result


def compare_hops(bridge: dict, shaped: dict, net: str) -> dict:
    """Per hop: what the bridge's profile plus the links predict, what the shaped cluster measured."""
    base = Profile.model_validate(bridge["profile"])
    predicted = predicted_hops(base, LINK_PRESETS[net])
    measured = {hop: shaped["profile"]["hops"][hop]["mean_ms"] for hop in HOPS}
    return {hop: {"predicted_ms": predicted[hop], "measured_ms": measured[hop],
                  "measured_over_predicted": measured[hop] / predicted[hop]} for hop in HOPS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, default=Path("artifacts/default"))
    ap.add_argument("--texts", type=int, default=200, help=f"texts of the test split per mode (after {WARMUP} warm-up)")
    ap.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    manifest = artifact.read_manifest(args.artifact)
    texts = artifact.load_split(args.artifact, "test", manifest).texts[:WARMUP + args.texts]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="links-bench-") as work:
        for net in args.networks:
            runs[net] = one_network(net, args.artifact, Path(work), texts)
            r = runs[net]
            print(f"{net}: served {r['served']['ratio']:.3f}x, predicted {r['predicted']['ratio']:.3f}x, wire "
                  f"{r['wire']}, bytes {r['bytes']['1']['wire_over_float32']:.3f}x of float32", flush=True)
    if "bridge" in runs:
        for net in set(runs) & set(LINK_PRESETS):
            runs[net]["hops_against_prediction"] = compare_hops(runs["bridge"], runs[net], net)
    emit({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "artifact": str(args.artifact), "runs": runs}, args.out)


if __name__ == "__main__":
    main()
