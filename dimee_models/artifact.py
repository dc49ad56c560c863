"""The artifact directory: tier weights (safetensors), tokenizer, splits and a checksummed manifest.

Layout:
    manifest.json            what the model is, how it was trained, sha256 of every other file
                             (its fields: dimee_models/manifest.py)
    config.json              the backbone's transformers config
    tokenizer/               tokenizer files
    cloud.safetensors        the full model: embeddings, all layers, every exit head
    mobile.safetensors       embeddings + layers 1..m + exit head m
    edge.safetensors         layers m+1..e + exit head e
    splits/{train,calibration,test}.jsonl
    (later issues add policy and cached outputs; every file is listed in the manifest)
    cluster-profile.json     `dimee up`'s measurement of the cluster: kept here, not checksummed
                             (it describes the cluster, not the model, and is re-measured in place)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from dimee_models.data import Splits, TextDataset
from dimee_models.manifest import FORMAT_VERSION, Manifest, TierFile, tier_specs
from dimee_models.tiers import Tier

# torch and transformers are imported where weights or a tokenizer are loaded, so that reading a
# manifest (the first check of every command) costs no seconds of imports.
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from dimee_models.model import MultiExitEncoder

MANIFEST = "manifest.json"
CLUSTER_PROFILE = "cluster-profile.json"


class ArtifactError(ValueError):
    """The artifact is missing, incomplete or modified; the message names the file."""


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
    facts: dict,
) -> Manifest:
    """Write a fresh artifact; `facts` are the caller's fields of the manifest (backbone, training, metrics)."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out / "tokenizer")
    (out / "splits").mkdir(exist_ok=True)
    for part in ("train", "calibration", "test"):
        write_jsonl(out / "splits" / f"{part}.jsonl", getattr(splits, part).to_rows())
    manifest = Manifest(
        model_type=model.config.model_type,
        num_layers=model.num_layers,
        hidden_size=model.config.hidden_size,
        num_labels=model.num_labels,
        split_sizes={p: len(getattr(splits, p)) for p in ("train", "calibration", "test")},
        **facts,
        tiers=write_tiers(out, model, **facts["exits"]),
        files={},  # write_manifest checksums them
    )
    return write_manifest(out, manifest)


def write_tiers(out: Path, full: MultiExitEncoder, mobile: int, edge: int) -> dict[str, TierFile]:
    """One safetensors file per tier, cut from the full model; returns their sizes for the manifest."""
    from safetensors.torch import save_file

    info = {}
    for spec in tier_specs(full.num_layers, mobile, edge).values():
        part = full.tier(spec.start, spec.end, spec.embeddings, list(spec.head_layers))
        state = {k: v.detach().contiguous() for k, v in part.state_dict().items()}
        save_file(state, out / f"{spec.tier.label}.safetensors")
        params, nbytes = part.parameter_bytes()
        info[spec.tier.label] = TierFile(file=f"{spec.tier.label}.safetensors", layers=[spec.start + 1, spec.end],
                                         embeddings=spec.embeddings, exit_heads=list(spec.head_layers),
                                         parameters=params, parameter_bytes=nbytes)
    return info


def write_manifest(out: Path, manifest: Manifest) -> Manifest:
    """Checksum every file in the directory (except the manifest and the cluster profile) and write the manifest with them;
    returns it as `read_manifest` will (the free-form `training` and `metrics` as JSON has them)."""
    files = {str(p.relative_to(out)): sha256(p) for p in sorted(out.rglob("*"))
             if p.is_file() and p.name not in (MANIFEST, CLUSTER_PROFILE)}
    text = manifest.model_copy(update={"files": files}).to_json()
    (out / MANIFEST).write_text(text + "\n")
    return Manifest.model_validate_json(text)


def read_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """The manifest, after checking that every listed file exists and matches its checksum."""
    root = Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root} is not a DIMEE artifact: {MANIFEST} not found")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON: {err}") from None
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if version != FORMAT_VERSION:  # before the fields: another version may have other ones
        raise ArtifactError(f"{path}: unsupported format_version {version!r}")
    try:
        manifest = Manifest.model_validate(doc)
    except ValidationError as err:
        error = err.errors()[0]
        raise ArtifactError(f"{path}: invalid field {'.'.join(map(str, error['loc']))}: {error['msg']}") from None
    if verify:
        for name, digest in manifest.files.items():
            file = root / name
            if not file.is_file():
                raise ArtifactError(f"artifact file missing: {file}")
            if sha256(file) != digest:
                raise ArtifactError(f"artifact file modified since it was written (sha256 mismatch): {file}")
    return manifest


def load_tier(directory: str | Path, tier: Tier, manifest: Manifest | None = None) -> MultiExitEncoder:
    """A module holding exactly one tier's weights, in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from dimee_models.model import MultiExitEncoder

    root = Path(directory)
    manifest = manifest or read_manifest(root)
    config = AutoConfig.from_pretrained(root)
    spec = manifest.specs()[tier]
    model = MultiExitEncoder.empty_tier(
        config, manifest.num_labels, spec.start, spec.end, spec.embeddings, list(spec.head_layers)
    )
    model.load_state_dict(load_file(root / manifest.tiers[tier.label].file), strict=True)
    return model.eval()


def load_full(directory: str | Path, manifest: Manifest | None = None) -> MultiExitEncoder:
    return load_tier(directory, Tier.CLOUD, manifest)


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(directory) / "tokenizer")


def load_split(directory: str | Path, part: str, manifest: Manifest | None = None) -> TextDataset:
    root = Path(directory)
    manifest = manifest or read_manifest(root)
    # "\n" only: str.splitlines() also splits at U+0085, U+2028, U+2029 and the like, which JSON
    # keeps raw inside strings (write_jsonl's ensure_ascii=False), so a text holding one would break.
    text = (root / "splits" / f"{part}.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.split("\n") if line]
    return TextDataset.from_rows(f"{manifest.dataset.name}:{part}", rows, manifest.labels)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
