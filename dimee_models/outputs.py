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
from transformers import PreTrainedTokenizerBase

from dimee_models import artifact
from dimee_models.data import TextDataset
from dimee_models.manifest import Manifest
from dimee_models.model import MultiExitEncoder
from dimee_models.batching import batches, model_inputs

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


class OutputSource:
    """One artifact's exit outputs, its model loaded once if anything must be computed. A split's
    outputs are computed once and cached in the artifact (`outputs/<part>.safetensors`); whoever
    computed one writes the manifest (`split_outputs` does), so that it lists the cache."""

    def __init__(self, directory: str | Path, manifest: Manifest | None = None):
        self.root = Path(directory)
        self.manifest = manifest or artifact.read_manifest(self.root)
        self.cached = False  # a split's outputs were computed and cached: the manifest must list them

    @cached_property
    def model(self) -> tuple[MultiExitEncoder, PreTrainedTokenizerBase]:
        return artifact.load_full(self.root, self.manifest), artifact.load_tokenizer(self.root)

    def split(self, part: str) -> ExitOutputs:
        """Every exit's logits and the mobile embedding on a split."""
        if part not in ("train", "calibration", "test"):
            raise ValueError(f"outputs are computed for the train, calibration and test splits, not {part!r}")
        cache = self.root / "outputs" / f"{part}.safetensors"
        if cache.is_file():
            arrays = load_file(cache)
            if "z_layers" in arrays:  # older caches held one exit's embedding only
                return self._outputs(arrays)
        ds = artifact.load_split(self.root, part, self.manifest)
        if part == "train":
            ds = ds.subset(range(min(len(ds), TRAIN_ROWS)))
        arrays = self._compute(ds)
        cache.parent.mkdir(exist_ok=True)
        save_file(arrays, cache)
        self.cached = True
        return self._outputs(arrays)

    def texts(self, texts: list[str]) -> ExitOutputs:
        """The same outputs for unlabelled texts (labels -1), not cached."""
        return self._outputs(self._compute(TextDataset("unlabeled", texts, [-1] * len(texts), self.manifest.labels)))

    def _outputs(self, arrays: dict[str, np.ndarray]) -> ExitOutputs:
        m, e = self.manifest.exits.mobile, self.manifest.exits.edge
        return ExitOutputs(arrays["logits"], arrays["z_layers"][:, m - 1], arrays["labels"], m, e, arrays["z_layers"])

    def _compute(self, ds: TextDataset) -> dict[str, np.ndarray]:
        model, tokenizer = self.model
        logits, z = [], []
        with torch.inference_mode():
            for enc, _ in batches(ds, tokenizer, 64, self.manifest.max_length):
                outs = model(**model_inputs(enc))
                logits.append(torch.stack([o.logits for o in outs], dim=1))  # (B, L, C)
                z.append(torch.stack([o.pooled for o in outs], dim=1))  # (B, L, H): any layer can be the mobile exit
        return {"logits": torch.cat(logits).numpy(), "z_layers": torch.cat(z).numpy(), "labels": np.asarray(ds.labels)}


def split_outputs(directory: str | Path, part: str, manifest: Manifest | None = None) -> ExitOutputs:
    """A split's outputs (`OutputSource.split`), the manifest written if they were computed now."""
    source = OutputSource(directory, manifest)
    out = source.split(part)
    if source.cached:
        artifact.write_manifest(source.root, source.manifest)
    return out


def text_outputs(directory: str | Path, texts: list[str], manifest: Manifest | None = None) -> ExitOutputs:
    return OutputSource(directory, manifest).texts(texts)
