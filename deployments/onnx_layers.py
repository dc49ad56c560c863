"""A tier's layers and exit head on ONNX Runtime: the same weights and the same float32 arithmetic as
the torch module they are exported from, at 0.54x of eager torch's cost per layer for one text on
this CPU (docs/RESULTS.md, "The device slice"). Eager torch pays its Python dispatch on every small
matrix product of a one-text request; a graph runtime does not.

A tier starts from a hidden state at one or a few layers (edge at the mobile exit; cloud from token
ids, the mobile exit, or edge's on escalation), so one session per starting layer, exported from the
tier's torch module when the replica starts (~2 s each; any other start when first asked for).
Embeddings stay in torch (a lookup).
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from dimee_models.model import HiddenState, MultiExitEncoder

log = logging.getLogger("ray.serve")


class _Slice(nn.Module):
    """(hidden, mask) at layer `start` -> (exit logits, pooled z, hidden) at layer `end`."""

    def __init__(self, model: MultiExitEncoder, start: int, end: int):
        super().__init__()
        self.model, self.start, self.end = model, start, end

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = self.model.run_layers(HiddenState(hidden, mask, self.start), self.end)
        out = self.model.exit(state)
        return out.logits, out.pooled, state.hidden


class OnnxLayers:
    """The layers [start, end) of `model` and its exit head, for each of `starts`."""

    def __init__(self, model: MultiExitEncoder, starts: set[int], end: int, threads: int):
        self.model, self.end = model, end
        self.options = ort.SessionOptions()
        self.options.intra_op_num_threads, self.options.inter_op_num_threads = threads, 1
        self.sessions = {start: self._export(start) for start in sorted(starts)}

    def run(self, state: HiddenState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits (B, C), pooled (B, H), hidden (B, T, H)) after layers [state.layer, end)."""
        if state.layer not in self.sessions:  # a start not foreseen (a profile's hop from edge's last layer)
            self.sessions[state.layer] = self._export(state.layer)
        inputs = {"hidden": state.hidden.numpy(), "mask": state.attention_mask.numpy()}
        return tuple(self.sessions[state.layer].run(None, inputs))

    def _export(self, start: int) -> ort.InferenceSession:
        began = time.perf_counter()
        directory = tempfile.TemporaryDirectory(prefix="dimee-onnx-")
        path = Path(directory.name) / f"layers-{start}-{self.end}.onnx"
        width = self.model.config.hidden_size
        # padding in the example: tracing records the masked path, which every batch then takes
        example = torch.zeros(2, 4, width), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on constant shapes: the axes below are dynamic
            torch.onnx.export(_Slice(self.model, start, self.end).eval(), example, str(path), dynamo=False,
                              input_names=["hidden", "mask"], output_names=["logits", "pooled", "out"],
                              dynamic_axes={"hidden": {0: "batch", 1: "tokens"}, "mask": {0: "batch", 1: "tokens"}})
        session = ort.InferenceSession(str(path), self.options, providers=["CPUExecutionProvider"])
        directory.cleanup()  # the session holds the graph
        log.info("layers [%d, %d) exported to ONNX Runtime in %.1f s", start, self.end, time.perf_counter() - began)
        return session
