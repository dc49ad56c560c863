"""A tier's slice of the model, and the deployment that serves edge and cloud with it.

`TierRunner` computes one tier's slice for a batch of requests: the mobile slice inside the
ingress (deployments/router.py), the edge and cloud slices in `TierModel`, one deployment class
bound twice with its own layer range. A replica loads only its tier's weights from the artifact.
Requests arriving together share one forward pass (`@serve.batch`); every sample keeps its own
result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque
from pathlib import Path

import numpy as np
import ray
import torch
from ray import serve
from ray.serve import metrics

from deployments.schemas import HiddenArrays, HiddenRef, HiddenWire, Runtime, TierReply, TierRequest, Tokens
from deployments import weights
from dimee_models import artifact
from dimee_models.manifest import Manifest
from dimee_models.model import HiddenState
from dimee_models.outputs import softmax
from dimee_models.policy import served_wire
from dimee_models.tiers import Tier
from dimee_models.wire import Format, pack, unpack

log = logging.getLogger("ray.serve")
# The hidden state's owner (this replica) keeps each reference alive this long: a reference that
# leaves a Serve deployment inside a reply is not always counted by Ray (ray-project/ray#51953), and
# under load the object was freed before edge/cloud fetched it. Far above any hop's timeout.
HIDDEN_TTL_S = 30.0
# A hidden state up to this size travels inside the tier call itself, as Ray passes arguments up to
# its max_direct_call_object_size (100 KiB) inline: one text's (~42 KB for MiniLM in float32) then costs no put
# and no fetch from the owner, which cost 7-8 ms more than its bytes (docs/DECISIONS.md, "Serving"). Larger ones
# go through the object store.
INLINE_BYTES = 100 * 1024


def pad_stack(arrays: list[np.ndarray], length: int, value: float = 0) -> np.ndarray:
    """Right-pad (b_i, T_i, ...) arrays along T to `length` and stack them along the batch."""
    padded = [np.pad(a, [(0, 0), (0, length - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=value)
              for a in arrays]
    return np.concatenate(padded)


class TierRunner:
    """One tier's layers, exit head and metrics; `forward` runs a batch of requests through them."""

    def __init__(self, artifact_dir: str, tier: Tier, manifest: Manifest | None = None, source: str | None = None,
                 fetch_report: dict | None = None, runtime: Runtime = "onnxruntime"):
        """`manifest`: the directory's, already checked (a fetched view holds only this tier's files);
        `source`, `fetch_report`: where they were fetched from and how (`weights.fetch`); `runtime`:
        what runs the layers (dimee_models/onnx_layers.py), torch's eager modules or ONNX Runtime."""
        manifest = manifest or artifact.read_manifest(artifact_dir)
        self.artifact_dir = artifact_dir
        self.tier = tier
        self.model = artifact.load_tier(artifact_dir, tier, manifest)
        self.end = manifest.tier_exits[tier]
        # an int8 mobile slice where the policies were certified on one (dimee_models/onnx_layers.py)
        self.int8 = tier is Tier.MOBILE and served_wire(artifact_dir).mobile_slice == "int8"
        if self.int8 and runtime != "onnxruntime":
            raise ValueError(f"{artifact_dir}: its policies were certified on an int8 mobile slice, which only "
                             "ONNX Runtime runs (the mobile tier's runtime is torch)")
        self.runtime = runtime + " int8" * self.int8
        self.onnx = None
        if runtime == "onnxruntime":
            from dimee_models.onnx_layers import OnnxLayers

            # where this tier's batches start: token ids (mobile, and cloud for cloud-only), or a hidden state
            starts = {0, manifest.exits.mobile, manifest.exits.edge} & set(range(self.model.first_layer, self.end))
            self.onnx = OnnxLayers(self.model, starts, self.end, torch.get_num_threads(), self.int8)
        self.source = {manifest.exits.mobile: Tier.MOBILE, manifest.exits.edge: Tier.EDGE}  # who stored a hidden state
        self.pad_id = self.model.config.pad_token_id or 0
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None  # None: no Ray
        self.held: deque[tuple[float, ray.ObjectRef]] = deque()  # (expiry, hidden-state reference)
        self.requests_served = 0  # shown by describe(): which tiers a request reached
        self.artifact_source, self.fetch_report = source or artifact_dir, fetch_report
        self.compute_ms = metrics.Histogram(
            "dimee_tier_compute_ms", "layer compute of one forward pass (a whole batch), ms",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000], tag_keys=("tier",))
        self.batch_size = metrics.Histogram(
            "dimee_tier_batch_size", "requests merged into one forward pass by @serve.batch",
            boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("tier",))
        self.offloaded = metrics.Counter(
            "dimee_hidden_state_bytes", "bytes of hidden state fetched from the object store, per hop",
            tag_keys=("hop",))
        self.refs_held = metrics.Gauge(
            "dimee_hidden_refs_held", "hidden-state references this replica keeps alive (each for HIDDEN_TTL_S)",
            tag_keys=("tier",))
        self.refs_held.set_default_tags({"tier": tier.label})
        self.compute_ms.set_default_tags({"tier": tier.label})
        self.batch_size.set_default_tags({"tier": tier.label})
        params, nbytes = self.model.parameter_bytes()
        log.info("%s tier: layers ..%d, %d parameters (%.1f MiB)", tier.label, self.end, params, nbytes / 2**20)

    def check_health(self) -> None:
        """Serve's periodic health check: the weights are loaded and a one-sample forward pass works."""
        with torch.inference_mode():
            if self.model.embeddings is not None:
                state = self.model.embed(torch.full((1, 2), self.pad_id), torch.ones(1, 2, dtype=torch.long))
            else:
                state = HiddenState(torch.zeros(1, 2, self.model.config.hidden_size), torch.ones(1, 2, dtype=torch.long),
                                    self.model.first_layer)
            logits = self.model.exit(self.model.run_layers(state, self.end)).logits
        if not torch.isfinite(logits).all():
            raise RuntimeError(f"{self.tier.label} tier: the health-check forward pass gave non-finite logits")

    def describe(self) -> dict:
        params, nbytes = self.model.parameter_bytes()
        return {"tier": self.tier.label, "artifact": self.artifact_source, "node_id": self.node_id,
                "files": sorted(str(p.relative_to(self.artifact_dir)) for p in Path(self.artifact_dir).rglob("*")
                                if p.is_file()),
                "fetch": self.fetch_report,
                "parameters": params, "parameter_bytes": nbytes,
                "runtime": self.runtime,
                "holds_embeddings": self.model.embeddings is not None, "first_layer": self.model.first_layer,
                "layers": len(self.model.layers), "exit_heads": sorted(int(k) for k in self.model.heads),
                "requests_served": self.requests_served}

    async def forward(self, requests: list[TierRequest]) -> list[TierReply]:
        refs = [r.input for r in requests if isinstance(r.input, HiddenRef)]
        fetched = iter(await asyncio.gather(*(h.ref for h in refs)))
        for r in requests:
            if not isinstance(r.input, Tokens):
                self.offloaded.inc(r.input.nbytes, tags={"hop": f"{self.source[r.input.layer].label}->{self.tier.label}"})
        self.batch_size.observe(len(requests))
        self.requests_served += len(requests)
        inputs = [HiddenWire(next(fetched), r.input.layer) if isinstance(r.input, HiddenRef) else r.input
                  for r in requests]
        replies: list[TierReply | None] = [None] * len(requests)
        for start in sorted({i.layer for i in inputs}):  # one forward per starting layer
            members = [k for k, i in enumerate(inputs) if i.layer == start]
            for k, reply in zip(members, await asyncio.to_thread(self._forward, [requests[k] for k in members],
                                                                 [inputs[k] for k in members], start, len(requests))):
                replies[k] = reply
        return replies

    def _forward(self, requests: list[TierRequest], inputs: list[Tokens] | list[HiddenWire], start: int,
                 batch: int) -> list[TierReply]:
        began = time.perf_counter()
        with torch.inference_mode():
            state = self._state(inputs, start)
            if self.onnx is not None:
                logits, pooled, hidden = self.onnx.run(state)
            else:
                last = self.model.run_layers(state, self.end)
                out = self.model.exit(last)
                logits, pooled, hidden = out.logits.numpy(), out.pooled.numpy(), last.hidden.numpy()
        probs = softmax(logits)
        mask = state.attention_mask.numpy()
        compute_ms = (time.perf_counter() - began) * 1000
        self.compute_ms.observe(compute_ms)
        replies, lo = [], 0
        for r, i in zip(requests, inputs):
            rows = slice(lo, lo + len(i.input_ids if isinstance(i, Tokens) else i.packed.lengths))
            lo = rows.stop
            kept = HiddenArrays(hidden[rows], mask[rows], self.end) if r.keep_hidden else None
            replies.append(TierReply(
                probs=probs[rows], exit_layer=self.end, z=pooled[rows] if self.tier is Tier.MOBILE else None,
                hidden=kept, compute_ms=compute_ms, batch_size=batch,
                received=RECEIVED[type(r.input)], node_id=self.node_id,
            ))
        return replies

    def store(self, arrays: HiddenArrays, rows: list[int] | None = None,
              fmt: Format = "float32") -> HiddenWire | HiddenRef:
        """`rows` of a hidden state (all by default) for the next tier, as `fmt` (dimee_models/wire.py):
        inline if small, else put into the object store with the reference held."""
        hidden, mask = (arrays.hidden, arrays.mask) if rows is None else (arrays.hidden[rows], arrays.mask[rows])
        packed = pack(hidden, mask, fmt)
        if packed.nbytes <= INLINE_BYTES:
            return HiddenWire(packed, arrays.layer)
        return HiddenRef(self._hold(ray.put(packed)), arrays.layer, packed.nbytes)

    def _hold(self, ref: ray.ObjectRef) -> ray.ObjectRef:
        now = time.monotonic()
        while self.held and self.held[0][0] < now:
            self.held.popleft()
        self.held.append((now + HIDDEN_TTL_S, ref))
        self.refs_held.set(len(self.held))
        return ref

    def _state(self, inputs: list[Tokens] | list[HiddenWire], start: int) -> HiddenState:
        if start == 0:
            length = max(len(row) for t in inputs for row in t.input_ids)
            ids = np.concatenate([_pad_rows(t.input_ids, length, self.pad_id) for t in inputs])
            mask = np.concatenate([_pad_rows([[1] * len(row) for row in t.input_ids], length, 0) for t in inputs])
            types = None
            if all(t.token_type_ids is not None for t in inputs):
                types = torch.as_tensor(np.concatenate([_pad_rows(t.token_type_ids, length, 0) for t in inputs]))
            return self.model.embed(torch.as_tensor(ids), torch.as_tensor(mask), types)
        unpacked = [unpack(h.packed) for h in inputs]
        length = max(hidden.shape[1] for hidden, _ in unpacked)
        hidden = pad_stack([hidden for hidden, _ in unpacked], length)
        mask = pad_stack([mask for _, mask in unpacked], length)
        return HiddenState(torch.from_numpy(hidden), torch.from_numpy(mask), start)


RECEIVED = {Tokens: "tokens", HiddenWire: "inline", HiddenRef: "object_store"}  # how a tier's input arrived


def threads_from_cpu_share() -> None:
    """A replica's torch threads follow the CPU share it was given (its config may override the code's)."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, math.ceil(cpus)))


def fetched_runner(source: str, tier: Tier, runtime: Runtime) -> TierRunner:
    """A tier's runner on its weights fetched from `source` into this node's cache (deployments/weights.py)."""
    directory, report = weights.fetch(source, tier.label)
    log.info("%s tier: %s fetched %s, cached %s in %.2f s", tier.label, source, report["fetched"], report["cached"],
             report["seconds"])
    return TierRunner(str(directory), tier, artifact.read_manifest(directory, verify=False), source, report, runtime)


@serve.deployment
class TierModel:
    """Edge or cloud: a `TierRunner` behind a Serve handle, batching the requests that arrive together."""

    def __init__(self, source: str, tier: Tier, max_batch_size: int, batch_wait_timeout_s: float,
                 runtime: Runtime = "onnxruntime"):
        threads_from_cpu_share()
        self.runner = fetched_runner(source, tier, runtime)
        self.max_batch_size = max_batch_size
        self.forward_batch.set_max_batch_size(max_batch_size)
        self.forward_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def __call__(self, request: TierRequest) -> TierReply:
        return await self.forward_batch(request)

    def check_health(self) -> None:
        self.runner.check_health()

    def describe(self) -> dict:
        return {**self.runner.describe(), "max_batch_size": self.max_batch_size}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def forward_batch(self, requests: list[TierRequest]) -> list[TierReply]:
        replies = await self.runner.forward(requests)
        return [self.store_kept(request, reply) for request, reply in zip(requests, replies)]

    def store_kept(self, request: TierRequest, reply: TierReply) -> TierReply:
        """The reply with the hidden state it kept stored for cloud (escalation), only the rows
        below `keep_below` if set; without a hidden state if no row is."""
        if reply.hidden is None:
            return reply
        rows = None if request.keep_below is None else np.flatnonzero(reply.probs.max(-1) < request.keep_below).tolist()
        stored = self.runner.store(reply.hidden, rows, request.wire) if rows != [] else None
        return dataclasses.replace(reply, hidden=stored)


def _pad_rows(rows, length: int, value: int) -> np.ndarray:
    """Token-id lists (ragged) -> (b, length) int64 array."""
    out = np.full((len(rows), length), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
