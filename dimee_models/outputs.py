"""The model's outputs on a split as arrays (`ExitOutputs`), computed once and cached in the
artifact (`split_outputs`): what calibration and evaluation read instead of running the model.

The training split's outputs are what the tier boundaries are chosen on (dimee_models/calibration.py):
a data set the calibration split's guarantee does not depend on. The model has seen these texts, so
they only choose, never certify; the first TRAIN_ROWS of the (shuffled) training split are enough
for that and bound the forward pass it costs on a large training set.

A deployment whose links carry a rounded hidden state, or token ids to cloud (dimee_models/wire.py),
answers past mobile otherwise than the float32 model: `OutputSource.wire_split` recomputes those
exits from what crosses each link, as served, and keeps the float32 final exit as the reference
every loss is counted against."""

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
from dimee_models.model import HiddenState, MultiExitEncoder
from dimee_models.batching import batches, model_inputs
from dimee_models.onnx_layers import OnnxLayers
from dimee_models.wire import Wire, round_trip

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
    # Where a wire rounds (Wire.rounds): logits past the mobile exit are computed from what crossed
    # the link, and these (N, C) hold the answers that differ by path; None: the final exit's.
    cloud_logits: np.ndarray | None = field(default=None, repr=False)  # mobile -> cloud, as carried
    escalated_logits: np.ndarray | None = field(default=None, repr=False)  # mobile -> edge -> cloud
    reference_logits: np.ndarray | None = field(default=None, repr=False)  # the float32 model's final exit
    wire: Wire | None = None  # the wire these outputs were computed for (None: float32, nothing rounded)

    @property
    def num_layers(self) -> int:
        return self.logits.shape[1]

    def probs(self, layer: int) -> np.ndarray:
        return softmax(self.logits[:, layer - 1])  # (N, C)

    def path_logits(self) -> list[np.ndarray]:
        """(N, C) logits of each path of cost.PATHS: mobile, edge, cloud, edge_cloud, cloud_only."""
        final = self.logits[:, -1]
        cloud = final if self.cloud_logits is None else self.cloud_logits
        return [self.logits[:, self.mobile_exit - 1], self.logits[:, self.edge_exit - 1], cloud,
                cloud if self.escalated_logits is None else self.escalated_logits,
                final if self.reference_logits is None else self.reference_logits]

    @cached_property
    def path_predictions(self) -> np.ndarray:
        """(N, 5) predicted label id on each path of cost.PATHS (cloud_only: the float32 final exit)."""
        return np.stack([logits.argmax(-1) for logits in self.path_logits()], axis=1)

    @cached_property
    def path_confidences(self) -> np.ndarray:
        return np.stack([softmax(logits).max(-1) for logits in self.path_logits()], axis=1)  # (N, 5)

    @property
    def tier_predictions(self) -> np.ndarray:
        """(N, 3) predicted label id at the mobile, edge and final exits (cloud as reached from mobile)."""
        return self.path_predictions[:, :3]

    @property
    def tier_confidences(self) -> np.ndarray:
        return self.path_confidences[:, :3]  # (N, 3)

    @property
    def reference(self) -> np.ndarray:
        """(N,) the float32 model's final-exit prediction: what every loss is counted against."""
        return self.path_predictions[:, 4]

    def answers(self, paths: np.ndarray) -> np.ndarray:
        """(N,) each sample's predicted label id on its path (indices into cost.PATHS)."""
        return self.path_predictions[np.arange(len(paths)), paths]

    def tier_exits(self) -> tuple[int, int, int]:
        return self.mobile_exit, self.edge_exit, self.num_layers

    def take(self, rows: np.ndarray) -> ExitOutputs:
        arrays = {k: None if v is None else v[rows] for k, v in self._arrays().items()}
        return ExitOutputs(mobile_exit=self.mobile_exit, edge_exit=self.edge_exit, wire=self.wire, **arrays)

    def concat(self, other: ExitOutputs) -> ExitOutputs:
        if other.wire != self.wire:
            raise ValueError("outputs computed for different wires cannot be pooled")
        theirs = other._arrays()
        arrays = {k: None if v is None or theirs[k] is None else np.concatenate([v, theirs[k]])
                  for k, v in self._arrays().items()}
        return ExitOutputs(mobile_exit=self.mobile_exit, edge_exit=self.edge_exit, wire=self.wire, **arrays)

    def _arrays(self) -> dict[str, np.ndarray | None]:
        return {k: getattr(self, k) for k in ("logits", "z", "labels", "z_layers", "cloud_logits", "escalated_logits",
                                              "reference_logits")}

    def at(self, mobile_exit: int, edge_exit: int) -> ExitOutputs:
        """The same outputs with the tier boundaries at other exits (edge may run to the last layer)."""
        if (mobile_exit, edge_exit) == (self.mobile_exit, self.edge_exit):
            return self
        if not 1 <= mobile_exit < edge_exit <= self.num_layers:
            raise ValueError(f"exits must satisfy 1 <= mobile ({mobile_exit}) < edge ({edge_exit}) <= "
                             f"{self.num_layers}")
        if self.wire is not None:
            raise ValueError("these outputs were computed for one wire at their exits: compute them at the others")
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

    def wire_split(self, part: str, mobile_exit: int, edge_exit: int, wire: Wire) -> ExitOutputs:
        """A split's outputs at these exits as served over `wire` (`with_wire`), cached per wire and exits."""
        out = self.split(part).at(mobile_exit, edge_exit)
        if not wire.rounds:
            return out
        if not wire.changes_states:  # only cloud's carrier differs
            return with_wire(out, wire, None)
        int8 = "-int8-mobile" if wire.mobile_slice == "int8" else ""
        cache = self.root / "outputs" / f"{part}-{wire.format}-{mobile_exit}-{edge_exit}{int8}.safetensors"
        if not cache.is_file():
            ds = artifact.load_split(self.root, part, self.manifest)
            if part == "train":
                ds = ds.subset(range(min(len(ds), TRAIN_ROWS)))
            save_file(self._compute_wire(ds, mobile_exit, edge_exit, wire), cache)
        return with_wire(out, wire, load_file(cache))

    def served(self, ds: TextDataset, wire: Wire, exits: tuple[int, int] | None = None) -> ExitOutputs:
        """These texts' outputs, not cached, at `exits` (default: the manifest's) as served over `wire`."""
        out = self._outputs(self._compute(ds))
        out = out.at(*exits) if exits else out
        if not wire.changes_states:
            return with_wire(out, wire, None)
        return with_wire(out, wire, self._compute_wire(ds, out.mobile_exit, out.edge_exit, wire))

    def _compute_wire(self, ds: TextDataset, m: int, e: int, wire: Wire) -> dict[str, np.ndarray]:
        model, tokenizer = self.model
        # the int8 slice as a mobile replica runs it: a row's answer does not depend on its batch
        int8 = OnnxLayers(model, {0}, m, torch.get_num_threads(), int8=True) if wire.mobile_slice == "int8" else None
        after, escalated, at_mobile, z = [], [], [], []
        with torch.inference_mode():
            for enc, _ in batches(ds, tokenizer, 64, self.manifest.max_length):
                inputs = model_inputs(enc)
                state = model.embed(**inputs)
                if int8 is None:
                    state = model.run_layers(state, m)
                else:
                    logits, pooled, hidden = int8.run(state)
                    at_mobile.append(logits)
                    z.append(pooled)
                    state = HiddenState(torch.from_numpy(hidden), state.attention_mask, m)
                state = self._crossed(state, wire)
                logits = []
                for layer in range(m + 1, model.num_layers + 1):
                    state = model.run_layers(state, layer)
                    logits.append(model.exit(state).logits)
                    if layer == e:
                        edge_state = state
                after.append(torch.stack(logits, dim=1))  # (B, L - m, C)
                if e < model.num_layers:
                    state = model.run_layers(self._crossed(edge_state, wire), model.num_layers)
                escalated.append(model.exit(state).logits)
        arrays = {"after_mobile": torch.cat(after).numpy(), "escalated": torch.cat(escalated).numpy()}
        if int8 is not None:
            arrays |= {"mobile": np.concatenate(at_mobile), "z": np.concatenate(z)}
        return arrays

    @staticmethod
    def _crossed(state: HiddenState, wire: Wire) -> HiddenState:
        mask = state.attention_mask.numpy()
        hidden = round_trip(state.hidden.numpy(), mask, wire.format)
        return HiddenState(torch.from_numpy(hidden), state.attention_mask, state.layer)

    def texts(self, texts: list[str], wire: Wire = Wire()) -> ExitOutputs:
        """The same outputs for unlabelled texts (labels -1), not cached."""
        return self.served(TextDataset("unlabeled", texts, [-1] * len(texts), self.manifest.labels), wire)

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


def with_wire(out: ExitOutputs, wire: Wire, arrays: dict[str, np.ndarray] | None) -> ExitOutputs:
    """`out` (float32, at its exits) as served over `wire`: past the mobile exit, the logits computed
    from what crossed each link (`arrays`: OutputSource._compute_wire's; None where nothing rounds),
    cloud's as its carrier brings them, and the float32 final exit as the reference."""
    if not wire.rounds:
        return out
    m, final, z = out.mobile_exit, out.logits[:, -1], out.z
    logits = out.logits.copy()
    if arrays is not None:
        logits[:, m:] = arrays["after_mobile"]
    if arrays is not None and "mobile" in arrays:  # an int8 mobile slice: its exit and z too
        logits[:, m - 1], z = arrays["mobile"], arrays["z"]
    cloud = final if wire.carrier == "tokens" else logits[:, -1]
    escalated = logits[:, -1] if arrays is None else arrays["escalated"]
    return ExitOutputs(logits, z, out.labels, m, out.edge_exit, None, cloud, escalated, final, wire)


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def split_outputs(directory: str | Path, part: str, manifest: Manifest | None = None) -> ExitOutputs:
    """A split's outputs (`OutputSource.split`), the manifest written if they were computed now."""
    source = OutputSource(directory, manifest)
    out = source.split(part)
    if source.cached:
        artifact.write_manifest(source.root, source.manifest)
    return out


def text_outputs(directory: str | Path, texts: list[str], manifest: Manifest | None = None,
                 wire: Wire = Wire()) -> ExitOutputs:
    return OutputSource(directory, manifest).texts(texts, wire)
