"""The device slice on four runtimes, one text at a time, one thread (a 0.5-CPU replica's): eager
torch float32, ONNX Runtime float32 (what tiers run, dimee_models/onnx_layers.py), ONNX Runtime int8
as `--mobile-slice int8` serves it (MatMulNBits: int8 weights with a scale per block of 32, products
in int8, each row's activations scaled per block) and ONNX Runtime's dynamic int8 (`quantize_dynamic`:
weights per output channel, activations scaled per tensor, so a text's answer depends on its batch;
not served). Per layer: the slice of m layers less the slice of one, over m - 1, median over the
test split's texts. Per exit 1..m: test accuracy against eager torch's.

    python -m load.device_slice_bench --artifact artifacts/default --out docs/results/links/device-slice.json
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from dimee_models import artifact
from dimee_models.onnx_layers import quantize_int8
from load.client import emit


class Exits(nn.Module):
    """Token ids -> every exit's logits (B, layers, C) up to `layers`."""

    def __init__(self, model, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        state, logits = self.model.embed(ids, mask), []
        for layer in range(1, self.layers + 1):
            state = self.model.run_layers(state, layer)
            logits.append(self.model.exit(state).logits)
        return torch.stack(logits, 1)


def sessions(module: nn.Module, directory: Path, name: str) -> dict:
    """The eager module, and ONNX Runtime sessions of it in float32 and int8, each as ids -> logits."""
    path, dynamic, int8 = (directory / f"{name}{kind}.onnx" for kind in ("", "-dynamic", "-int8"))
    example = torch.tensor([[101, 2000, 2001, 102], [101, 2000, 102, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), input_names=["ids", "mask"], output_names=["logits"],
                          dynamic_axes={"ids": {0: "b", 1: "t"}, "mask": {0: "b", 1: "t"}}, dynamo=False)
    quantize_dynamic(str(path), str(dynamic), weight_type=QuantType.QInt8, per_channel=True)
    shutil.copy(path, int8)
    quantize_int8(int8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1

    def onnx(file: Path):
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        return lambda ids, mask: session.run(None, {"ids": ids, "mask": mask})[0]

    def eager(ids, mask):
        with torch.inference_mode():
            return module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    return {"torch_float32": eager, "onnxruntime_float32": onnx(path), "onnxruntime_int8_dynamic": onnx(dynamic),
            "onnxruntime_int8": onnx(int8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, default=Path("artifacts/default"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    manifest = artifact.read_manifest(args.artifact)
    model, m = artifact.load_full(args.artifact, manifest).eval(), manifest.exits.mobile
    test = artifact.load_split(args.artifact, "test", manifest)
    encoded = artifact.load_tokenizer(args.artifact)(test.texts, test.text_pairs, truncation=True,
                                                     max_length=manifest.max_length)["input_ids"]
    texts = [(np.array([ids]), np.ones((1, len(ids)), dtype=np.int64)) for ids in encoded]
    ms, logits = {}, {}
    with tempfile.TemporaryDirectory() as directory:
        for layers in (1, m):
            for runtime, run in sessions(Exits(model, layers).eval(), Path(directory), f"exits-{layers}").items():
                times, outs = [], []
                for ids, mask in texts:
                    began = time.perf_counter()
                    outs.append(run(ids, mask)[0])
                    times.append(time.perf_counter() - began)
                ms[runtime, layers], logits[runtime, layers] = float(np.median(times)) * 1000, np.stack(outs)
    labels, base = np.asarray(test.labels), "torch_float32"
    per_layer = {r: (ms[r, m] - ms[r, 1]) / (m - 1) for r, _ in ms}
    accuracy = {r: [float((logits[r, m][:, i].argmax(-1) == labels).mean()) for i in range(m)] for r, _ in ms}
    result = {"artifact": str(args.artifact), "texts": len(texts), "mobile_exit": m, "runtimes": {
        r: {"slice_ms": ms[r, m], "layer_ms": per_layer[r], "layer_over_torch": per_layer[r] / per_layer[base],
            "accuracy_per_exit": accuracy[r],
            "pp_against_torch": [round((a - b) * 100, 2) for a, b in zip(accuracy[r], accuracy[base])],
            "agreement_with_torch": [float((logits[r, m][:, i].argmax(-1) == logits[base, m][:, i].argmax(-1)).mean())
                                     for i in range(m)]}
        for r, _ in ms if _ == m}}
    for r, row in result["runtimes"].items():
        print(f"{r:20s} slice {row['slice_ms']:6.2f} ms, layer {row['layer_ms']:5.2f} ms "
              f"({row['layer_over_torch']:.3f}x), pp per exit {row['pp_against_torch']}")
    emit(result, args.out)


if __name__ == "__main__":
    main()
