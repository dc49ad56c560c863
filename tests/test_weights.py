"""How an artifact's files reach a node: only a role's files, each checked, cached by checksum;
from a directory or from a real S3-compatible server (moto's, started here)."""

import shutil

import pytest

from deployments import weights
from dimee_models import artifact
from dimee_models.artifact import ArtifactError
from dimee_models.policy import load_policies
from dimee_models.tiers import Tier
from tests.conftest import moto_server, upload


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIMEE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def listed(directory) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def test_each_role_gets_only_its_files_each_fetched_once_per_node(served_artifact, cache):
    manifest = artifact.read_manifest(served_artifact)
    views = {}
    for tier in Tier:
        views[tier], report = weights.fetch(str(served_artifact), tier.label)
        assert set(report["fetched"]) | set(report["cached"]) == set(weights.role_files(manifest, tier.label))
    tokenizer = {f for f in manifest.files if f.startswith("tokenizer/")}
    assert listed(views[Tier.MOBILE]) == {"manifest.json", "config.json", "mobile.safetensors", "policy.json",
                                          "policy.safetensors"} | tokenizer
    assert listed(views[Tier.EDGE]) == {"manifest.json", "config.json", "edge.safetensors"}
    assert listed(views[Tier.CLOUD]) == {"manifest.json", "config.json", "cloud.safetensors"}
    # a view loads as the artifact does
    assert load_policies(views[Tier.MOBILE])[0].keys() == load_policies(served_artifact)[0].keys()
    view_manifest = artifact.read_manifest(views[Tier.CLOUD], verify=False)
    assert artifact.load_tier(views[Tier.CLOUD], Tier.CLOUD, view_manifest).num_layers == manifest.num_layers
    # a second replica on this node fetches nothing
    _, again = weights.fetch(str(served_artifact), "edge")
    assert again["fetched"] == {} and sorted(again["cached"]) == sorted(weights.role_files(manifest, "edge"))
    blobs = {p.name for p in (cache / "blobs").iterdir() if not p.name.endswith(".lock")}
    assert blobs == {manifest.files[f] for t in Tier for f in weights.role_files(manifest, t.label)}


def test_a_file_that_does_not_match_its_checksum_is_refused_and_not_cached(served_artifact, cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(served_artifact, copy)
    (copy / "edge.safetensors").write_bytes((copy / "edge.safetensors").read_bytes()[:-1] + b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        weights.fetch(str(copy), "edge")
    digest = artifact.read_manifest(served_artifact).files["edge.safetensors"]
    assert not (cache / "blobs" / digest).exists()


def test_a_missing_artifact_is_named(tmp_path, cache):
    with pytest.raises(ArtifactError, match="not a DIMEE artifact"):
        weights.fetch(str(tmp_path / "nothing"), "edge")


@pytest.fixture(scope="module")
def s3_server():
    with moto_server("127.0.0.1") as address:
        yield address


def test_an_artifact_in_s3_is_fetched_by_role_and_checked(served_artifact, cache, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    uri = f"s3://dimee/models/rt?endpoint_override={s3_server}&scheme=http&region=us-east-1"
    upload(served_artifact, uri)
    view, report = weights.fetch(uri, "cloud")
    assert set(report["fetched"]) == {"config.json", "cloud.safetensors"}
    assert (view / "cloud.safetensors").read_bytes() == (served_artifact / "cloud.safetensors").read_bytes()
    with pytest.raises(ArtifactError, match="not a DIMEE artifact"):
        weights.fetch(f"s3://dimee/models/none?endpoint_override={s3_server}&scheme=http&region=us-east-1", "cloud")
