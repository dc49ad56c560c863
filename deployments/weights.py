"""How an artifact's files reach the nodes that serve it, with no shared filesystem.

An artifact is named by a *source*: a directory on the head (the node that runs `dimee serve` /
`dimee up`, and Serve's controller) or a storage URI (`s3://bucket/prefix`, `gs://...`, any
filesystem pyarrow reads). Every replica, and the app builder, asks for the files of its own role
only (`ROLE_FILES`: a mobile host never holds the cloud slice), checks each against the
manifest's sha256, and keeps it in its node's cache by checksum (`DIMEE_CACHE_DIR`, default
/tmp/dimee-cache-UID): a second or restarted replica on that node reads the cache and fetches nothing.
Each artifact (by its manifest's checksum) and role gets a view in the cache, a folder laid out as
the artifact with links into the cache, so the loading code reads it as any artifact directory.

A directory on the head is served by `HeadDisk`, a detached actor on the node labelled
`dimee.io/role=head`: it reads the files from the head's disk on demand (holding nothing), so it
outlives the command that deployed, and a head that comes back under `--ha` brings it back with
the same disk. The ingress replicas append the shadow log (`shadow_log`) through it too, so
that `dimee calibrate --from-traffic` finds it on the head. A new tier file (`dimee up`'s tuning) has a new checksum, so it is fetched anew;
a live `policy_artifact` switch fetches that copy's policy files the same way. Why not runtime_env
or a `ray.put` by the CLI: docs/DECISIONS.md, "Weights to the nodes".
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path

import ray

from dimee_models.artifact import MANIFEST, ArtifactError, sha256
from dimee_models.manifest import Manifest
from dimee_models.policy import POLICY_JSON, POLICY_TENSORS

STORE_NAME, STORE_NAMESPACE = "dimee-head-disk", "dimee"
HEAD_LABEL_KEY, HEAD_LABEL_VALUE = "dimee.io/role", "head"
HEAD_LABEL = f"{HEAD_LABEL_KEY}={HEAD_LABEL_VALUE}"
CHUNK = 16 << 20  # bytes per read from the store: a few in flight keep the link busy, not the memory full
IN_FLIGHT = 4


def cache_dir() -> Path:
    """This node's cache; one per user, as /tmp is everyone's."""
    return Path(os.environ.get("DIMEE_CACHE_DIR", f"/tmp/dimee-cache-{os.getuid()}"))


def is_uri(source: str) -> bool:
    return "://" in source


def role_files(manifest: Manifest, role: str) -> list[str]:
    """The artifact's files a role needs: a tier's weights and the model config; the ingress (mobile)
    also the tokenizer and the policies; `policy` the policies alone (a live switch, the builder)."""
    policy = [f for f in manifest.files if f in (POLICY_JSON, POLICY_TENSORS)]
    if role == "policy":
        return policy
    weights = ["config.json", manifest.tiers[role].file]
    if role == "mobile":
        return weights + [f for f in manifest.files if f.startswith("tokenizer/")] + policy
    return weights


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class HeadDisk:
    """The head's disk for the other nodes: serves the files of artifact directories there, only
    those their manifest lists, read on demand (and counts each node's first reads of each file:
    `fetches`); appends to the shadow log there."""

    def __init__(self):
        self.fetched: Counter[tuple[str, str]] = Counter()

    def manifest(self, root: str) -> str:
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise ArtifactError(f"{root} on the head is not a DIMEE artifact: {MANIFEST} not found")
        return path.read_text()

    def file(self, root: str, name: str) -> Path:
        """A file the artifact's manifest lists, and no other."""
        if name not in Manifest.model_validate_json(self.manifest(root)).files:
            raise ArtifactError(f"{name} is not a file of the artifact {root}")
        return Path(root) / name

    def read(self, root: str, name: str, offset: int, size: int, node_id: str) -> bytes:
        path = self.file(root, name)
        if offset == 0:
            self.fetched[(node_id, f"{root}/{name}")] += 1
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def size(self, root: str, name: str) -> int:
        return self.file(root, name).stat().st_size

    def append(self, path: str, text: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)

    def fetches(self) -> dict[str, dict[str, int]]:
        """{node id: {artifact directory/file: times fetched from the start}} since this actor started."""
        out: dict[str, dict[str, int]] = {}
        for (node, name), count in self.fetched.items():
            out.setdefault(node, {})[name] = count
        return out


def store():
    """The running store, started on the head node if there is none."""
    try:
        return ray.get_actor(STORE_NAME, namespace=STORE_NAMESPACE)
    except ValueError:
        pass
    if not any(n["Alive"] and n.get("Labels", {}).get(HEAD_LABEL_KEY) == HEAD_LABEL_VALUE for n in ray.nodes()):
        raise RuntimeError(f"no node of this Ray cluster carries the label {HEAD_LABEL}: start the head with "
                           f"`ray start --head --labels={HEAD_LABEL}` (the node whose disk holds the artifact), or "
                           "serve the artifact from a storage URI")
    return HeadDisk.options(name=STORE_NAME, namespace=STORE_NAMESPACE, lifetime="detached",
                            get_if_exists=True, label_selector={HEAD_LABEL_KEY: HEAD_LABEL_VALUE}).remote()


class Source:
    """Where an artifact's files come from: the store on the head, or a storage URI."""

    def __init__(self, source: str):
        self.source = source
        self.open = None  # a file's reader, or None: the store's
        if is_uri(source):
            from pyarrow import fs

            filesystem, self.root = fs.FileSystem.from_uri(source)
            self.open = filesystem.open_input_stream
        elif not ray.is_initialized():  # offline tools and tests: this machine's disk
            self.open, self.root = partial(open, mode="rb"), str(Path(source).resolve())
        else:
            self.root, self.store = source, store()

    def manifest_text(self) -> str:
        if self.open is not None:
            try:
                with self.open(f"{self.root}/{MANIFEST}") as f:
                    return f.read().decode()
            except FileNotFoundError:
                raise ArtifactError(f"{self.source} is not a DIMEE artifact: {MANIFEST} not found") from None
        return _get(self.store.manifest.remote(self.root))

    def copy(self, name: str, dest, node_id: str) -> None:
        if self.open is not None:
            with self.open(f"{self.root}/{name}") as f:
                while block := f.read(CHUNK):
                    dest.write(block)
            return
        size = _get(self.store.size.remote(self.root, name))
        offsets = list(range(0, size, CHUNK)) or [0]
        pending = [self.store.read.remote(self.root, name, o, CHUNK, node_id) for o in offsets[:IN_FLIGHT]]
        for k in range(len(offsets)):
            dest.write(_get(pending[k]))
            pending[k] = None  # the chunk's bytes go once written
            if k + IN_FLIGHT < len(offsets):
                pending.append(self.store.read.remote(self.root, name, offsets[k + IN_FLIGHT], CHUNK, node_id))


def _get(ref):
    """The store's answer; an error it raised as itself (its message says what is wrong), not wrapped."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        raise err.cause from None


def fetch(source: str, role: str) -> tuple[Path, dict]:
    """A local artifact folder holding `role`'s files of `source` (see `role_files`), each checked
    against the manifest; returns it and what this call did: {"fetched": {file: bytes}, "cached":
    [files], "seconds": s}."""
    began = time.monotonic()
    src = Source(source)
    text = src.manifest_text()
    try:
        manifest = Manifest.model_validate_json(text)
    except ValueError as err:
        raise ArtifactError(f"{source}: its {MANIFEST} is not a valid manifest: {err}") from None
    root = cache_dir()
    view = root / "views" / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}-{role}"
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    report: dict = {"fetched": {}, "cached": []}
    for name in role_files(manifest, role):
        digest = manifest.files[name]
        blob = root / "blobs" / digest
        if _fill(blob, digest, lambda f, n=name: src.copy(n, f, node_id)):
            report["fetched"][name] = blob.stat().st_size
        else:
            report["cached"].append(name)
        _link(view / name, blob)
    _write_atomic(view / MANIFEST, text.encode())
    report["seconds"] = round(time.monotonic() - began, 3)
    return view, report


def _fill(blob: Path, digest: str, write) -> bool:
    """Put the file with this sha256 at `blob` unless it is there; True if it was fetched. One
    fetch per node: a second caller waits on the lock and then finds the blob."""
    if blob.is_file():
        return False
    blob.parent.mkdir(parents=True, exist_ok=True)
    with open(blob.parent / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if blob.is_file():
            return False
        with tempfile.NamedTemporaryFile(dir=blob.parent, delete=False) as tmp:
            try:
                write(tmp)
                tmp.close()
                got = sha256(Path(tmp.name))
                if got != digest:
                    raise ArtifactError(f"fetched file has sha256 {got}, the manifest says {digest}")
                os.replace(tmp.name, blob)
            finally:
                Path(tmp.name).unlink(missing_ok=True)
    return True


def _link(path: Path, target: Path) -> None:
    if path.is_symlink() and path.resolve() == target.resolve():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, path)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def fetch_counts() -> dict[str, dict[str, int]]:
    """The store's count of first reads of each file by each node (see `HeadDisk.fetches`)."""
    return ray.get(store().fetches.remote())
