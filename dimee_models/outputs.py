"""The model's outputs on a split as arrays (`ExitOutputs`), computed once and cached in the
artifact (`split_outputs`): what calibration and evaluation read instead of running the model.

The training split's outputs are what the tier boundaries are chosen on (dimee_models/calibration.py):
a data set the calibration split's guarantee does not depend on. The model has seen these texts, so
they only choose, never certify; the first TRAIN_ROWS of the (shuffled) training split are enough
for that and bound the forward pass it costs on a large training set."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from dimee_models import artifact
from dimee_models.data import TextDataset
from dimee_models.manifest import Manifest
from dimee_models.train import batches, model_inputs

TRAIN_ROWS = 4000  # of the training split, to choose the tier boundaries on


@dataclass(frozen=True)
class ExitOutputs:
    """The model's outputs on one split, as arrays: everything routing and evaluation read."""

    logits: np.ndarray  # (N, L, C) every exit
    z: np.ndarray  # (N, H) pooled layer-m representation (the mobile embedding)
    labels: np.ndarray  # (N,)
    mobile_exit: int
    edge_exit: int
    # (N, L, H) every layer's pooled representation, when cached: lets the tier boundaries move
    z_layers: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return self.logits.shape[1]

    def probs(self, layer: int) -> np.ndarray:
        logits = self.logits[:, layer - 1]
        exp = np.exp(logits - logits.max(-1, keepdims=True))
        return exp / exp.sum(-1, keepdims=True)  # (N, C)

    @cached_property
    def tier_predictions(self) -> np.ndarray:
        """(N, 3) predicted label id at the mobile, edge and final exits."""
        return np.stack([self.logits[:, k - 1].argmax(-1) for k in self.tier_exits()], axis=1)

    @cached_property
    def tier_confidences(self) -> np.ndarray:
        return np.stack([self.probs(k).max(-1) for k in self.tier_exits()], axis=1)  # (N, 3)

    def tier_exits(self) -> tuple[int, int, int]:
        return self.mobile_exit, self.edge_exit, self.num_layers

    def take(self, rows: np.ndarray) -> ExitOutputs:
        return ExitOutputs(self.logits[rows], self.z[rows], self.labels[rows], self.mobile_exit, self.edge_exit,
                           None if self.z_layers is None else self.z_layers[rows])

    def concat(self, other: ExitOutputs) -> ExitOutputs:
        layers = (None if self.z_layers is None or other.z_layers is None
                  else np.concatenate([self.z_layers, other.z_layers]))
        return ExitOutputs(np.concatenate([self.logits, other.logits]), np.concatenate([self.z, other.z]),
                           np.concatenate([self.labels, other.labels]), self.mobile_exit, self.edge_exit, layers)

    def at(self, mobile_exit: int, edge_exit: int) -> ExitOutputs:
        """The same outputs with the tier boundaries at other exits (edge may run to the last layer)."""
        if (mobile_exit, edge_exit) == (self.mobile_exit, self.edge_exit):
            return self
        if not 1 <= mobile_exit < edge_exit <= self.num_layers:
            raise ValueError(f"exits must satisfy 1 <= mobile ({mobile_exit}) < edge ({edge_exit}) <= "
                             f"{self.num_layers}")
        if mobile_exit != self.mobile_exit and self.z_layers is None:
            raise ValueError("these outputs hold the mobile embedding of one exit only: recompute them to move it")
        z = self.z if mobile_exit == self.mobile_exit else self.z_layers[:, mobile_exit - 1]
        return ExitOutputs(self.logits, z, self.labels, mobile_exit, edge_exit, self.z_layers)


def split_outputs(directory: str | Path, part: str, manifest: Manifest | None = None) -> ExitOutputs:
    """Every exit's logits and the mobile embedding on a split, computed once and cached in the
    artifact (`outputs/<part>.safetensors`, listed in the manifest)."""
    if part not in ("train", "calibration", "test"):
        raise ValueError(f"outputs are computed for the train, calibration and test splits, not {part!r}")
    root = Path(directory)
    manifest = manifest or artifact.read_manifest(root)
    m, e = manifest.exits.mobile, manifest.exits.edge
    cache = root / "outputs" / f"{part}.safetensors"
    if cache.is_file():
        arrays = load_file(cache)
        if "z_layers" in arrays:  # older caches held one exit's embedding only
            return ExitOutputs(arrays["logits"], arrays["z_layers"][:, m - 1], arrays["labels"], m, e,
                               arrays["z_layers"])
    ds = artifact.load_split(root, part, manifest)
    if part == "train":
        ds = ds.subset(range(min(len(ds), TRAIN_ROWS)))
    arrays = _compute(root, manifest, ds)
    cache.parent.mkdir(exist_ok=True)
    save_file(arrays, cache)
    artifact.write_manifest(root, manifest)
    return ExitOutputs(arrays["logits"], arrays["z_layers"][:, m - 1], arrays["labels"], m, e, arrays["z_layers"])


def text_outputs(directory: str | Path, texts: list[str], manifest: Manifest | None = None) -> ExitOutputs:
    """The same outputs for unlabelled texts (labels -1), not cached."""
    root = Path(directory)
    manifest = manifest or artifact.read_manifest(root)
    arrays = _compute(root, manifest, TextDataset("unlabeled", texts, [-1] * len(texts), manifest.labels))
    m, e = manifest.exits.mobile, manifest.exits.edge
    return ExitOutputs(arrays["logits"], arrays["z_layers"][:, m - 1], arrays["labels"], m, e, arrays["z_layers"])


def _compute(root: Path, manifest: Manifest, ds: TextDataset) -> dict[str, np.ndarray]:
    model, tokenizer = artifact.load_full(root, manifest), artifact.load_tokenizer(root)
    logits, z = [], []
    with torch.inference_mode():
        for enc, _ in batches(ds, tokenizer, 64, manifest.max_length):
            outs = model(**model_inputs(enc))
            logits.append(torch.stack([o.logits for o in outs], dim=1))  # (B, L, C)
            z.append(torch.stack([o.pooled for o in outs], dim=1))  # (B, L, H): any layer can be the mobile exit
    return {"logits": torch.cat(logits).numpy(), "z_layers": torch.cat(z).numpy(), "labels": np.asarray(ds.labels)}
