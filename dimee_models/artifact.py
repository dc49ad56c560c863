"""The artifact directory: tier weights (safetensors), tokenizer, splits and a checksummed manifest.

Layout:
    manifest.json            what the model is, how it was trained, sha256 of every other file
    config.json              the backbone's transformers config
    tokenizer/               tokenizer files
    cloud.safetensors        the full model: embeddings, all layers, every exit head
    mobile.safetensors       embeddings + layers 1..m + exit head m
    edge.safetensors         layers m+1..e + exit head e
    splits/{train,calibration,test}.jsonl
    (later issues add policy and cached outputs; every file is listed in the manifest)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dimee_models.data import Splits, TextDataset
from dimee_models.tiers import Tier

# torch and transformers are imported where weights or a tokenizer are loaded, so that reading a
# manifest (the first check of every command) costs no seconds of imports.
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from dimee_models.model import MultiExitEncoder

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """The artifact is missing, incomplete or modified; the message names the file."""


@dataclass(frozen=True)
class TierSpec:
    """Which part of the model a tier holds. Layers are 0-based `[start, end)`."""

    tier: Tier
    start: int
    end: int
    embeddings: bool
    head_layers: tuple[int, ...]


def tier_specs(num_layers: int, mobile_exit: int, edge_exit: int) -> dict[Tier, TierSpec]:
    """Mobile: embeddings + layers 1..m + head m. Edge: layers m+1..e + head e. Cloud: the full
    model with every head, so it can serve cloud-only requests and continue from any layer."""
    check_exits(num_layers, mobile_exit, edge_exit)
    return {
        Tier.MOBILE: TierSpec(Tier.MOBILE, 0, mobile_exit, True, (mobile_exit,)),
        Tier.EDGE: TierSpec(Tier.EDGE, mobile_exit, edge_exit, False, (edge_exit,)),
        Tier.CLOUD: TierSpec(Tier.CLOUD, 0, num_layers, True, tuple(range(1, num_layers + 1))),
    }


def check_exits(num_layers: int, mobile_exit: int, edge_exit: int) -> None:
    if not 1 <= mobile_exit < edge_exit < num_layers:
        raise ValueError(
            f"exits must satisfy 1 <= mobile ({mobile_exit}) < edge ({edge_exit}) < number of layers ({num_layers})"
        )


def default_exits(num_layers: int) -> tuple[int, int]:
    """Mobile after a third of the layers, edge after two thirds (6 layers: 2, 4; 12: 4, 8)."""
    return max(1, num_layers // 3), max(2, 2 * num_layers // 3)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save(
    out: Path,
    model: MultiExitEncoder,
    tokenizer: PreTrainedTokenizerBase,
    splits: Splits,
    manifest: dict,
) -> dict:
    """Write a fresh artifact; `manifest` carries the caller's facts (backbone, training, metrics)."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out / "tokenizer")
    (out / "splits").mkdir(exist_ok=True)
    for part in ("train", "calibration", "test"):
        write_jsonl(out / "splits" / f"{part}.jsonl", getattr(splits, part).to_rows())
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_type": model.config.model_type,
        "num_layers": model.num_layers,
        "hidden_size": model.config.hidden_size,
        "num_labels": model.num_labels,
        "split_sizes": {p: len(getattr(splits, p)) for p in ("train", "calibration", "test")},
        **manifest,
    }
    manifest["tiers"] = write_tiers(out, model, **manifest["exits"])
    return write_manifest(out, manifest)


def write_tiers(out: Path, full: MultiExitEncoder, mobile: int, edge: int) -> dict:
    """One safetensors file per tier, cut from the full model; returns their sizes for the manifest."""
    from safetensors.torch import save_file

    info = {}
    for spec in tier_specs(full.num_layers, mobile, edge).values():
        part = full.tier(spec.start, spec.end, spec.embeddings, list(spec.head_layers))
        state = {k: v.detach().contiguous() for k, v in part.state_dict().items()}
        save_file(state, out / f"{spec.tier.label}.safetensors")
        params, nbytes = part.parameter_bytes()
        info[spec.tier.label] = {
            "file": f"{spec.tier.label}.safetensors",
            "layers": [spec.start + 1, spec.end],
            "embeddings": spec.embeddings,
            "exit_heads": list(spec.head_layers),
            "parameters": params,
            "parameter_bytes": nbytes,
        }
    return info


def write_manifest(out: Path, manifest: dict) -> dict:
    """Checksum every file in the directory (except the manifest) and write the manifest."""
    manifest["files"] = {
        str(p.relative_to(out)): sha256(p) for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: str | Path, verify: bool = True) -> dict:
    """The manifest, after checking that every listed file exists and matches its checksum."""
    root = Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root} is not a DIMEE artifact: {MANIFEST} not found")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON: {err}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported format_version {manifest.get('format_version')!r}")
    if verify:
        for name, digest in manifest["files"].items():
            file = root / name
            if not file.is_file():
                raise ArtifactError(f"artifact file missing: {file}")
            if sha256(file) != digest:
                raise ArtifactError(f"artifact file modified since it was written (sha256 mismatch): {file}")
    return manifest


def load_tier(directory: str | Path, tier: Tier, manifest: dict | None = None) -> MultiExitEncoder:
    """A module holding exactly one tier's weights, in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from dimee_models.model import MultiExitEncoder

    root = Path(directory)
    manifest = manifest or read_manifest(root)
    config = AutoConfig.from_pretrained(root)
    spec = tier_specs(manifest["num_layers"], manifest["exits"]["mobile"], manifest["exits"]["edge"])[tier]
    model = MultiExitEncoder.empty_tier(
        config, manifest["num_labels"], spec.start, spec.end, spec.embeddings, list(spec.head_layers)
    )
    model.load_state_dict(load_file(root / manifest["tiers"][tier.label]["file"]), strict=True)
    return model.eval()


def load_full(directory: str | Path, manifest: dict | None = None) -> MultiExitEncoder:
    return load_tier(directory, Tier.CLOUD, manifest)


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(directory) / "tokenizer")


def load_split(directory: str | Path, part: str, manifest: dict | None = None) -> TextDataset:
    root = Path(directory)
    manifest = manifest or read_manifest(root)
    # "\n" only: str.splitlines() also splits at U+0085, U+2028, U+2029 and the like, which JSON
    # keeps raw inside strings (write_jsonl's ensure_ascii=False), so a text holding one would break.
    text = (root / "splits" / f"{part}.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.split("\n") if line]
    return TextDataset.from_rows(f"{manifest['dataset']['name']}:{part}", rows, manifest["labels"])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
