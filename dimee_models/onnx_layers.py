"""A tier's layers and exit head on ONNX Runtime: the same weights and the same float32 arithmetic as
the torch module they are exported from, at about half of eager torch's cost per layer for one text on
this CPU (docs/RESULTS.md, "The device slice"). Eager torch pays its Python dispatch on every small
matrix product of a one-text request; a graph runtime does not.

A tier starts from a hidden state at one or a few layers (edge at the mobile exit; cloud from token
ids, the mobile exit, or edge's on escalation), so one session per starting layer, exported from the
tier's torch module when the replica starts (~2 s each; any other start when first asked for).
Embeddings stay in torch (a lookup).

`int8`: the same layers with every weight matrix in int8 (ONNX Runtime's MatMulNBits: 8 bits, a
float scale per block of 32 input values) and their products in int8, each row's activations
scaled per block of 32 at run time. A row's answer does not depend on the batch it ran in, so the
offline outputs that certify an int8 mobile slice (dimee_models/outputs.py) are what it serves.
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
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from torch import nn

from dimee_models.model import HiddenState, MultiExitEncoder

log = logging.getLogger("ray.serve")
logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per node
INT8_BLOCK = 32  # inputs per scale: the most accurate of 32 and 128 on the calibration split (DECISIONS.md)
INT8_PRODUCTS = 4  # MatMulNBits' accuracy level 4: products in int8, not the weights widened to float32


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

    def __init__(self, model: MultiExitEncoder, starts: set[int], end: int, threads: int, int8: bool = False):
        self.model, self.end, self.int8 = model, end, int8
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
        if self.int8:
            quantize_int8(path)
        session = ort.InferenceSession(str(path), self.options, providers=["CPUExecutionProvider"])
        directory.cleanup()  # the session holds the graph
        log.info("layers [%d, %d) exported to ONNX Runtime%s in %.1f s", start, self.end, " as int8" * self.int8,
                 time.perf_counter() - began)
        return session


def quantize_int8(path: Path) -> None:
    """The ONNX model at `path`, rewritten with its weight matrices in int8 and their products in int8."""
    quantizer = MatMulNBitsQuantizer(str(path), bits=8, block_size=INT8_BLOCK, is_symmetric=True,
                                     accuracy_level=INT8_PRODUCTS)
    quantizer.process()
    quantizer.model.save_model_to_file(str(path), False)
