"""The artifact store, the same suite on file:// and on s3:// (a real SeaweedFS server)."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from vinasmol_core.common.errors import StoreError
from vinasmol_core.common.manifests import CheckpointManifest, DatasetManifest, FileEntry, TokenizerManifest
from vinasmol_core.store import ArtifactStore

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20


# ------------------------------------------------------------------------------------------------ helpers
def write_random(path: Path, size: int, seed: int | None = None, chunk: int = 8 * MB) -> None:
    """A file of `size` random bytes, written chunk by chunk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        left = size
        n = 0
        while left > 0:
            k = min(chunk, left)
            if seed is None:
                fh.write(os.urandom(k))
            else:  # deterministic, cheap
                block = hashlib.sha256(f"{seed}-{n}".encode()).digest()
                fh.write((block * (k // len(block) + 1))[:k])
            left -= k
            n += 1


def make_artifact(root: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    for i, (name, size) in enumerate(sizes.items()):
        write_random(root / name, size, seed=seed * 1000 + i)
    return root


def raw_objects(spec) -> dict[str, bytes | None]:  # noqa: ANN001
    """Every object under the store's root, listed behind the store's back: {key: None}."""
    if spec.kind == "file":
        root = Path(spec.url[len("file://") :])
        if not root.exists():
            return {}
        return {p.relative_to(root).as_posix(): None for p in root.rglob("*") if p.is_file()}
    client = _client(spec)
    bucket, prefix = spec.url[len("s3://") :].split("/", 1)
    resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1 :]: None for o in resp.get("Contents", [])}


def raw_put(spec, key: str, data: bytes) -> None:  # noqa: ANN001
    """Overwrite one object behind the store's back."""
    if spec.kind == "file":
        path = Path(spec.url[len("file://") :]) / key
        os.chmod(path, 0o644)
        path.write_bytes(data)
        return
    bucket, prefix = spec.url[len("s3://") :].split("/", 1)
    _client(spec).put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)


def raw_delete(spec, key: str) -> None:  # noqa: ANN001
    if spec.kind == "file":
        (Path(spec.url[len("file://") :]) / key).unlink()
        return
    bucket, prefix = spec.url[len("s3://") :].split("/", 1)
    _client(spec).delete_object(Bucket=bucket, Key=f"{prefix}/{key}")


def _client(spec):  # noqa: ANN001, ANN202
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=spec.options["endpoint_url"],
        aws_access_key_id=spec.options["key"],
        aws_secret_access_key=spec.options["secret"],
        region_name="us-east-1",
    )


CHILD = textwrap.dedent(
    """
    import os, signal, socket, sys, threading
    from pathlib import Path
    from vinasmol_core import store as S
    from vinasmol_core.common.manifests import DatasetManifest

    kill_after, go, jobs = int(sys.argv[1]), sys.argv[2], [a.split("|") for a in sys.argv[3:]]
    if kill_after:
        up = S._Counters.up
        def dying_up(self, n):
            up(self, n)
            if self.blobs_uploaded >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        S._Counters.up = dying_up
    if go != "-":  # after its first stored blob, wait until the test says that every publisher has one
        stored, first = S._Counters.up, threading.Lock()
        def meet_the_others(self, n):
            stored(self, n)
            if first.acquire(blocking=False):
                with socket.create_connection(("127.0.0.1", int(go))) as s:
                    s.sendall(b"in flight")
                    s.recv(2)
        S._Counters.up = meet_the_others
    store = S.ArtifactStore(None, max_workers=2)  # URL and credentials from the environment
    for src, name, ref in jobs:
        print(store.publish(DatasetManifest(name=name), Path(src), ref=ref or None).digest, flush=True)
    """
)


def child(spec, tmp_path: Path, jobs: list[tuple[Path, str, str]], kill_after: int = 0, go: str = "-"):  # noqa: ANN001, ANN201
    """A publisher process: publishes each (src, name, ref) in turn, printing each digest."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(spec.env)
    env["VINASMOL_CACHE"] = str(tmp_path / "child-cache")
    env["PYTHONPATH"] = str(REPO)
    args = [f"{src}|{name}|{ref}" for src, name, ref in jobs]
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(kill_after), go, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def big_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 MB of random bytes in one file, plus small and empty files in a subfolder."""
    root = tmp_path_factory.mktemp("big")
    write_random(root / "model.safetensors", 200 * MB)
    (root / "cfg").mkdir()
    (root / "cfg" / "config.json").write_text('{"n_layer": 2}')
    (root / "cfg" / "empty.txt").write_bytes(b"")
    return root


@pytest.fixture
def small_artifact(tmp_path: Path) -> Path:
    return make_artifact(
        tmp_path / "small", {"a.txt": 100, "sub/b.bin": 3 * MB, "sub/deeper/c.bin": 5000}, seed=1
    )


# ------------------------------------------------------------------------------------------------ tests
def test_200mb_artifact_round_trips_byte_identical(store: ArtifactStore, big_artifact: Path) -> None:
    m = store.publish(CheckpointManifest(name="big", format="hf"), big_artifact, ref="runs/r1/big")
    assert set(m.files) == {"model.safetensors", "cfg/config.json", "cfg/empty.txt"}
    assert m.files["model.safetensors"].size == 200 * MB
    assert store.bytes_uploaded == 200 * MB + len('{"n_layer": 2}')
    out = store.fetch("runs/r1/big")
    assert out.name == m.digest
    for rel in m.files:
        assert filecmp.cmp(big_artifact / rel, out / rel, shallow=False), rel
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(m.files)
    assert store.bytes_downloaded == store.bytes_uploaded


def test_publishing_twice_uploads_nothing_and_fetching_twice_downloads_nothing(
    store_spec, small_artifact: Path
) -> None:  # noqa: ANN001
    first = store_spec.open()
    m1 = first.publish(TokenizerManifest(name="tok", vocab_size=10, base_vocab_size=5), small_artifact)
    assert first.bytes_uploaded == sum(f.stat().st_size for f in small_artifact.rglob("*") if f.is_file())
    again = store_spec.open()  # a fresh process would see the same
    m2 = again.publish(TokenizerManifest(name="tok", vocab_size=10, base_vocab_size=5), small_artifact)
    assert again.bytes_uploaded == 0 and again.blobs_uploaded == 0
    assert m2.digest == m1.digest
    assert again.list_manifests() == [m1.digest]

    path = again.fetch(m1.digest)
    downloaded = again.bytes_downloaded
    assert downloaded > 0
    assert again.fetch(m1.digest) == path
    assert again.fetch(m1.digest[:10]) == path
    assert again.bytes_downloaded == downloaded


def test_refs_move_with_history_and_resolve(store: ArtifactStore, tmp_path: Path) -> None:
    a = store.publish(
        DatasetManifest(name="a"), make_artifact(tmp_path / "a", {"x": 10}, seed=2), ref="runs/r/data"
    )
    b = store.publish(DatasetManifest(name="b"), make_artifact(tmp_path / "b", {"x": 11}, seed=3))
    store.set_ref("runs/r/data", b.digest)
    store.set_ref("latest/data", "runs/r/data")
    assert store.resolve("runs/r/data") == b.digest
    assert store.resolve(a.digest[:8]) == a.digest
    assert store.list_refs() == {"latest/data": b.digest, "runs/r/data": b.digest}
    assert store.list_refs("runs/") == {"runs/r/data": b.digest}
    assert [mv.digest for mv in store.ref_history("runs/r/data")] == [a.digest, b.digest]
    assert store.get_manifest("latest/data").name == "b"
    store.delete_ref("latest/data")
    assert not store.exists("latest/data")
    assert [mv.digest for mv in store.ref_history("latest/data")] == [b.digest, None]


BAD_REFS = ["../x", "/abs/ref", "a//b", "a/../b", "runs/./x", "runs/", "", "a\\b", ".hidden", "runs/a b"]


def test_invalid_ref_names_are_refused_and_nothing_is_written(store_spec, small_artifact: Path) -> None:  # noqa: ANN001
    store = store_spec.open()
    for bad in BAD_REFS:
        with pytest.raises(StoreError, match="ref name"):
            store.publish(DatasetManifest(name="x"), small_artifact, ref=bad)
        with pytest.raises(StoreError, match="ref name"):
            store.set_ref(bad, "0" * 64)
    assert raw_objects(store_spec) == {}


def test_corrupt_blob_is_refused_at_fetch_naming_artifact_and_file(store_spec, small_artifact: Path) -> None:  # noqa: ANN001
    store = store_spec.open()
    m = store.publish(DatasetManifest(name="corpus-vi"), small_artifact, ref="runs/r/corpus")
    entry = m.files["sub/b.bin"]
    blob = f"blobs/{entry.sha256[:2]}/{entry.sha256}"
    raw_put(store_spec, blob, os.urandom(entry.size))  # same size, other bytes
    with pytest.raises(StoreError) as err:
        store.fetch("runs/r/corpus")
    assert "corpus-vi" in str(err.value) and "sub/b.bin" in str(err.value) and "sha256" in str(err.value)
    assert not (store.cache_dir / m.digest).exists()
    assert [p for p in store.cache_dir.iterdir() if p.name.startswith(".tmp-")] == []
    report = store.verify()
    assert not report.ok and any("sub/b.bin" in p and "corrupt" in p for p in report.problems)

    assert "verify --repair" in str(err.value) and "--force" in str(err.value)  # how to repair it

    # repair: the corrupt blob goes, publishing the same files again restores it, verify is clean
    report = store.verify(repair=True)
    assert report.removed == [entry.sha256]
    with pytest.raises(StoreError, match=r"corpus-vi.*sub/b\.bin.*missing.*--force"):
        store.fetch("runs/r/corpus")
    assert any("missing" in p for p in store.verify(hashes=False).problems)
    store.publish(DatasetManifest(name="corpus-vi"), small_artifact, ref="runs/r/corpus")
    assert store.verify().ok


def test_publisher_killed_before_its_manifest_leaves_no_manifest(store_spec, tmp_path: Path) -> None:  # noqa: ANN001
    sizes = {f"shard-{i}.bin": MB for i in range(5)} | {"mid.bin": 12 * MB, "big.bin": 18 * MB}
    src = make_artifact(tmp_path / "src", sizes, seed=4)
    proc = child(store_spec, tmp_path, [(src, "killed", "runs/r/killed")], kill_after=2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    store = store_spec.open()
    # Uploads run in parallel, so how many blobs the server finished before the kill varies.
    left = {k.rsplit("/", 1)[-1] for k in raw_objects(store_spec) if k.startswith("blobs/")}
    assert len(left) >= 2
    assert store.list_manifests() == [] and store.list_refs() == {}
    assert store.verify().ok
    m = store.publish(DatasetManifest(name="killed"), src, ref="runs/r/killed")
    missing = sum(e.size for e in m.files.values() if e.sha256 not in left)
    assert store.bytes_uploaded == missing  # blobs of the dead publisher are reused, only the rest sent
    assert store.verify().ok and store.list_manifests() == [m.digest]
    assert filecmp.cmp(store.fetch("runs/r/killed") / "big.bin", src / "big.bin", shallow=False)
    store.gc(grace=timedelta(0))  # aborts the dead publisher's partial uploads, keeps every named blob
    assert store.verify().ok


def test_concurrent_publishers(store_spec, tmp_path: Path) -> None:  # noqa: ANN001
    """Same artifact from two processes: one manifest. Different artifacts under one prefix: no clobbering."""
    same = make_artifact(tmp_path / "same", {"a.bin": MB, "b.bin": 17 * MB, "c.txt": 10}, seed=5)
    one = make_artifact(tmp_path / "one", {"a.bin": MB, "d.bin": 2 * MB}, seed=6)
    two = make_artifact(tmp_path / "two", {"a.bin": MB, "e.bin": 2 * MB}, seed=7)
    with socket.create_server(("127.0.0.1", 0)) as meeting:
        meeting.settimeout(120)
        go = str(meeting.getsockname()[1])
        procs = [
            child(store_spec, tmp_path, [(same, "same", "runs/r/same"), (one, "one", "runs/r/one")], go=go),
            child(store_spec, tmp_path, [(same, "same", "runs/r/same"), (two, "two", "runs/r/two")], go=go),
        ]
        # Both publishers have stored a blob and wait: neither has finished, so they overlap.
        waiting = [meeting.accept()[0] for _ in procs]
        for conn in waiting:
            conn.sendall(b"go")
            conn.close()
    digests = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        digests.append(out.split())
    (same_a, one_d), (same_b, two_d) = digests
    assert same_a == same_b and len({same_a, one_d, two_d}) == 3
    store = store_spec.open()
    assert store.list_manifests() == sorted([same_a, one_d, two_d])
    assert store.list_refs("runs/r/") == {"runs/r/same": same_a, "runs/r/one": one_d, "runs/r/two": two_d}
    assert [mv.digest for mv in store.ref_history("runs/r/same")] in ([same_a], [same_a, same_a])
    assert store.verify().ok
    assert filecmp.cmp(store.fetch("runs/r/same") / "b.bin", same / "b.bin", shallow=False)
    assert filecmp.cmp(store.fetch("runs/r/one") / "d.bin", one / "d.bin", shallow=False)
    assert filecmp.cmp(store.fetch("runs/r/two") / "e.bin", two / "e.bin", shallow=False)


BAD_PATHS = ["../x", "/etc/passwd", "a/../../x", "C:/x"]


def test_manifest_paths_escaping_the_folder_are_refused(store_spec, small_artifact: Path) -> None:  # noqa: ANN001
    store = store_spec.open()
    entry = FileEntry(sha256="0" * 64, size=1)
    for bad_path in BAD_PATHS:
        with pytest.raises(ValueError, match="file path"):
            DatasetManifest(name="evil", files={bad_path: entry})
        # A manifest built without validation is still refused at publish, before anything is written.
        evil = DatasetManifest.model_construct(name="evil", files={bad_path: entry})
        with pytest.raises(StoreError, match="file path"):
            store.publish(evil, ref="runs/r/evil")
    assert raw_objects(store_spec) == {}
    # A manifest planted in the store is refused at fetch; nothing lands outside the cache.
    good = store.publish(DatasetManifest(name="good"), small_artifact)
    for bad_path in BAD_PATHS:
        doc = json.loads(good.canonical_json())
        doc["files"] = {bad_path: doc["files"]["a.txt"]}
        body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        digest = hashlib.sha256(body).hexdigest()
        raw_put_new(store_spec, f"manifests/{digest}.json", body)
        with pytest.raises(StoreError, match=digest):
            store.fetch(digest)
    assert not (store.cache_dir.parent / "x").exists()
    assert not any(store.cache_dir.rglob("x"))
    assert len(store.verify(hashes=False).problems) == len(BAD_PATHS)


def raw_put_new(spec, key: str, data: bytes) -> None:  # noqa: ANN001
    if spec.kind == "file":
        path = Path(spec.url[len("file://") :]) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        raw_put(spec, key, data)


def test_missing_ref_or_digest_is_a_clear_error(store: ArtifactStore, small_artifact: Path) -> None:
    store.publish(DatasetManifest(name="d"), small_artifact, ref="runs/r/d")
    for name in ("runs/r/nope", "f" * 64, "abcdef12"):
        with pytest.raises(StoreError, match=name):
            store.fetch(name)
        with pytest.raises(StoreError, match=name):
            store.get_manifest(name)
        assert not store.exists(name)
    with pytest.raises(StoreError, match="runs/r/nope"):
        store.set_ref("latest/x", "runs/r/nope")
    assert "latest/x" not in store.list_refs()


def test_publish_without_src_needs_every_blob_in_the_store(
    store: ArtifactStore, small_artifact: Path
) -> None:
    m = store.publish(DatasetManifest(name="d"), small_artifact)
    again = store.publish(DatasetManifest(name="d2", files=m.files), ref="runs/r/d2")
    assert again.files == m.files and store.resolve("runs/r/d2") == again.digest
    ghost = DatasetManifest(name="ghost", files={"w.bin": FileEntry(sha256="1" * 64, size=5)})
    with pytest.raises(StoreError, match=r"ghost.*w\.bin"):
        store.publish(ghost, ref="runs/r/ghost")
    assert not store.exists("runs/r/ghost") and ghost.digest not in store.list_manifests()


def test_gc_deletes_only_old_unreferenced_blobs(store: ArtifactStore, tmp_path: Path) -> None:
    keep = store.publish(DatasetManifest(name="keep"), make_artifact(tmp_path / "k", {"k.bin": 1000}, seed=7))
    drop = store.publish(DatasetManifest(name="drop"), make_artifact(tmp_path / "d", {"d.bin": 2000}, seed=8))
    store.delete_manifest(drop.digest)
    young = store.gc()  # default grace: a day
    assert young.blobs_deleted == 0 and young.blobs_kept_recent == 1
    dry = store.gc(grace=timedelta(0), dry_run=True)
    assert dry.blobs_deleted == 1 and store.verify().ok
    report = store.gc(grace=timedelta(0))
    assert report.blobs_deleted == 1 and report.bytes_deleted == 2000
    assert store.verify().ok
    assert (store.fetch(keep.digest) / "k.bin").stat().st_size == 1000


def test_fetch_is_atomic_and_repairs_a_damaged_cache(store: ArtifactStore, small_artifact: Path) -> None:
    m = store.publish(DatasetManifest(name="d"), small_artifact)
    path = store.fetch(m.digest)
    (path / "sub" / "b.bin").write_bytes(b"truncated")
    again = store.fetch(m.digest)
    assert again == path and filecmp.cmp(
        path / "sub" / "b.bin", small_artifact / "sub" / "b.bin", shallow=False
    )


@pytest.mark.parametrize("when", ["before", "after"])
def test_publish_during_gc_reusing_an_orphan_blob_keeps_it(store_spec, tmp_path: Path, when: str) -> None:  # noqa: ANN001
    """A publish that reuses an unreferenced blob runs entirely just before (or after) gc's first
    removal of that blob: the published artifact must still fetch afterwards."""
    src = make_artifact(tmp_path / "src", {"w.bin": 10_000}, seed=9)
    store = store_spec.open()
    old = store.publish(DatasetManifest(name="old"), src)
    store.delete_manifest(old.digest)  # its blob is now an orphan, old enough for grace=0
    backend = store._backend
    fired: list[str] = []

    def publish_once() -> None:
        if not fired:
            other = store_spec.open(cache_dir=tmp_path / "other-cache")
            fired.append(other.publish(DatasetManifest(name="new"), src, ref="data/new").digest)

    def hooked(name: str):  # noqa: ANN202
        real = getattr(backend, name, None)

        def op(key: str, *rest: str) -> object:
            if not key.startswith("blobs/"):
                return real(key, *rest)
            if when == "before":
                publish_once()
            out = real(key, *rest)
            if when == "after":
                publish_once()
            return out

        return op

    backend.delete = hooked("delete")
    backend.move = hooked("move")
    store.gc(grace=timedelta(0))
    assert fired, "gc never removed the orphan blob"
    fresh = store_spec.open(cache_dir=tmp_path / "fresh-cache")
    assert fresh.verify().ok, fresh.verify().problems
    assert filecmp.cmp(fresh.fetch("data/new") / "w.bin", src / "w.bin", shallow=False)
    # Nothing references the blob once the new manifest goes too: the next gc reclaims it.
    fresh.delete_ref("data/new")
    fresh.delete_manifest(fired[0])
    assert fresh.gc(grace=timedelta(0)).bytes_deleted == 10_000
    assert not any(k.startswith(("blobs/", "trash/")) for k in raw_objects(store_spec))


def test_pruned_train_states_free_their_bytes_at_gc(store: ArtifactStore, tmp_path: Path) -> None:
    """The stage runner keeps the newest train-state; gc then frees exactly the other two states' bytes."""
    from types import SimpleNamespace

    from vinasmol_core.train.checkpoint import Checkpointer

    runner = SimpleNamespace(spec=SimpleNamespace(keep_checkpoints=1), store=store, prefix="partial/s/k")
    sizes = {}
    for step in (1, 2, 3):
        sizes_in = {"optimizer.safetensors": 100_000 + step}
        src = make_artifact(tmp_path / f"st{step}", sizes_in, seed=20 + step)
        (src / "model.bin").write_bytes(bytes([step]) * 7_000)  # unique per state
        m = store.publish(
            CheckpointManifest(name=f"s-step-{step}", format="train-state", step=step),
            src,
            ref=f"partial/s/k/step-{step:08d}",
        )
        sizes[step] = sum(e.size for e in m.files.values())
        Checkpointer.prune(runner, step)
    assert list(store.list_refs("partial/")) == ["partial/s/k/step-00000003"]
    report = store.gc(grace=timedelta(0))
    assert report.bytes_deleted == sizes[1] + sizes[2] == 200_003 + 2 * 7_000
    assert report.blobs_deleted == 4
    assert store.verify().ok and store.list_manifests() == [store.resolve("partial/s/k/step-00000003")]
    assert (store.fetch("partial/s/k/step-00000003") / "model.bin").read_bytes() == bytes([3]) * 7_000


def test_pruning_a_ref_keeps_a_manifest_another_ref_names(store: ArtifactStore, tmp_path: Path) -> None:
    src = make_artifact(tmp_path / "d", {"x.bin": 1000}, seed=10)
    m = store.publish(DatasetManifest(name="d"), src, ref="a")
    store.set_ref("b", "a")
    store.delete_ref("a", prune_manifest=True)
    assert store.list_manifests() == [m.digest]
    assert store.gc(grace=timedelta(0)).bytes_deleted == 0
    store.delete_ref("b", prune_manifest=True)
    assert store.list_manifests() == []
    assert store.gc(grace=timedelta(0)).bytes_deleted == 1000


def test_a_flipped_byte_in_the_cache_is_detected_and_fetched_again(store_spec, small_artifact: Path) -> None:  # noqa: ANN001
    store = store_spec.open()
    m = store.publish(DatasetManifest(name="d"), small_artifact, ref="d")
    path = store.fetch("d")
    files = [p for p in path.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o222 == 0 for p in files)  # read-only
    again = store_spec.open()  # a new process: nothing cached in memory
    assert again.fetch("d") == path and again.bytes_downloaded == 0
    target = path / "sub" / "b.bin"
    before = target.stat()
    os.chmod(target, 0o644)
    with open(target, "r+b") as fh:  # same size, one byte flipped, mtime put back
        fh.seek(100)
        old = fh.read(1)
        fh.seek(100)
        fh.write(bytes([old[0] ^ 0xFF]))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    third = store_spec.open()
    assert third.fetch("d") == path
    assert filecmp.cmp(path / "sub" / "b.bin", small_artifact / "sub" / "b.bin", shallow=False)
    assert third.bytes_downloaded == sum(e.size for e in m.files.values())
    assert (path / "sub" / "b.bin").stat().st_mode & 0o222 == 0


@pytest.mark.parametrize("pause_after", [1, 2])
def test_concurrent_ref_moves_leave_history_agreeing_with_ref(
    store: ArtifactStore, pause_after: int
) -> None:
    """Mover A is descheduled after its first (or second) write for the ref; mover B runs to completion;
    then A finishes. Whatever the ref ends up naming, its newest history entry names the same."""
    import threading

    a = store.publish(DatasetManifest(name="A"))
    b = store.publish(DatasetManifest(name="B"))
    backend = store._backend
    real_write, real_delete = backend.write, backend.delete
    paused, resume = threading.Event(), threading.Event()
    counts: dict[str, int] = {}

    def pause_a(key: str) -> None:
        if threading.current_thread().name == "mover-a" and key.startswith(("refs/x", "ref-history/x/")):
            counts["a"] = counts.get("a", 0) + 1
            if counts["a"] == pause_after:
                paused.set()
                assert resume.wait(10)

    def write(key: str, data: bytes) -> None:
        real_write(key, data)
        pause_a(key)

    def delete(key: str) -> None:
        real_delete(key)
        pause_a(key)

    backend.write, backend.delete = write, delete
    mover = threading.Thread(target=store.set_ref, args=("x", a.digest), name="mover-a")
    mover.start()
    assert paused.wait(10)
    store.set_ref("x", b.digest)
    resume.set()
    mover.join(10)
    history = store.ref_history("x")
    assert history and history[-1].digest == store.resolve("x")
    # A later deletion is recorded the same way.
    store.delete_ref("x")
    assert store.ref_history("x")[-1].digest is None
