"""Unlabelled in-domain texts a model has not seen, for `dimee calibrate --unlabeled`: the part
of its training split that `dimee train --max-train-samples N` left out (training takes the
split's first N texts, and the artifact stores only those). The split is redrawn from the
dataset with the artifact's fractions and seed, so it is the one training cut. Written as JSON
lines with each text's label (`--out X.jsonl`), `dimee evaluate --resamples` redraws them with the
labelled splits (calibration reads the texts only); else one text per line.

Reproduce (from the repository root, venv active):
    dimee train --dataset rt-polarity --max-train-samples 3500 --out artifacts/rt-half
    python -m analysis.heldout_texts artifacts/rt-half --out runs/rt-half-unlabeled.jsonl
    dimee calibrate artifacts/rt-half --unlabeled runs/rt-half-unlabeled.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dimee_models import artifact
from dimee_models.data import load_dataset, split


def heldout_texts(directory: Path) -> tuple[list[str], list[int]]:
    manifest = artifact.read_manifest(directory)
    t = manifest.training
    ds = load_dataset(manifest.dataset.name, t["text_column"], t["label_column"], t["text_pair_column"])
    train = split(ds, tuple(manifest.dataset.split_fractions), manifest.dataset.split_seed).train
    trained = artifact.load_split(directory, "train", manifest).texts
    if train.texts[:len(trained)] != trained:
        raise ValueError(f"{directory}: its training split is not the first texts of the dataset's redrawn one")
    if len(trained) == len(train):
        raise ValueError(f"{directory} was trained on its whole training split: no text is left unseen "
                         "(train with --max-train-samples N)")
    return train.texts[len(trained):], train.labels[len(trained):]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="where to write the texts, one per line")
    args = parser.parse_args()
    texts, labels = heldout_texts(args.artifact)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = ([json.dumps({"text": t, "label": int(y)}) for t, y in zip(texts, labels)]
             if args.out.suffix == ".jsonl" else [" ".join(t.split()) for t in texts])
    args.out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    print(f"wrote {len(texts)} texts the model has not seen to {args.out}")


if __name__ == "__main__":
    main()
