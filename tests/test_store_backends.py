"""Store URLs, defaults, credentials and S3 failure modes: each a clear StoreError, nothing written."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from vinasmol_core.common.errors import StoreError
from vinasmol_core.common.manifests import DatasetManifest
from vinasmol_core.store import ArtifactStore, default_cache_dir, default_store_url


def _artifact(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello")
    return src


def test_default_url_and_cache_follow_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VINASMOL_STORE", raising=False)
    monkeypatch.delenv("VINASMOL_CACHE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cachehome"))
    assert default_store_url() == (tmp_path / "data" / "vinasmol" / "store").as_uri()
    assert ArtifactStore().url == default_store_url()
    assert default_cache_dir() == tmp_path / "cachehome" / "vinasmol" / "artifacts"
    monkeypatch.setenv("VINASMOL_STORE", str(tmp_path / "plain-path"))
    monkeypatch.setenv("VINASMOL_CACHE", str(tmp_path / "c"))
    store = ArtifactStore()
    assert store.url == (tmp_path / "plain-path").as_uri() and store.cache_dir == tmp_path / "c"
    assert ArtifactStore(cache_dir=tmp_path / "arg").cache_dir == tmp_path / "arg"
    assert not (tmp_path / "plain-path").exists()  # opening a store writes nothing


def test_memory_store_round_trip(tmp_path: Path) -> None:
    store = ArtifactStore("memory://unit-test-store", cache_dir=tmp_path / "cache")
    m = store.publish(DatasetManifest(name="m"), _artifact(tmp_path), ref="latest/m")
    assert (store.fetch("latest/m") / "a.txt").read_text() == "hello"
    assert store.verify().ok and store.list_refs() == {"latest/m": m.digest}


@pytest.mark.parametrize("url", ["ftp://host/x", "gs://bucket/x", "nope://x"])
def test_unknown_scheme_is_refused(url: str) -> None:
    with pytest.raises(StoreError, match=r"unknown store URL scheme '(ftp|gs|nope)'"):
        ArtifactStore(url)


def test_credentials_never_appear_in_errors_or_repr(seaweed, s3_bucket: str, tmp_path: Path) -> None:  # noqa: ANN001
    secret = "wrong-secret-Zq9Xv3"
    bad = ArtifactStore(
        f"s3://{s3_bucket}/p", endpoint_url=seaweed.endpoint_url, key="WRONGKEY123", secret=secret
    )
    assert secret not in repr(bad) and "WRONGKEY123" not in repr(bad)
    with pytest.raises(StoreError) as err:
        bad.check_reachable()
    msg = str(err.value)
    assert "access denied" in msg and f"s3://{s3_bucket}/p" in msg and seaweed.endpoint_url in msg
    assert secret not in msg and "WRONGKEY123" not in msg
    with pytest.raises(StoreError, match="access denied"):
        bad.publish(DatasetManifest(name="x"), _artifact(tmp_path), ref="runs/r/x")
    good = seaweed.client()
    assert good.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0
    # wrong secret with a valid key
    half = ArtifactStore(
        f"s3://{s3_bucket}/p", endpoint_url=seaweed.endpoint_url, key=seaweed.access_key, secret=secret
    )
    with pytest.raises(StoreError, match="access denied") as err:
        half.list_refs()
    assert secret not in str(err.value) and seaweed.secret_key not in str(err.value)


def test_missing_bucket_is_named_and_not_created(seaweed, tmp_path: Path) -> None:  # noqa: ANN001
    opts = {"endpoint_url": seaweed.endpoint_url, "key": seaweed.access_key, "secret": seaweed.secret_key}
    store = ArtifactStore("s3://no-such-bucket-here/store", **opts)
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist"):
        store.check_reachable()
    with pytest.raises(StoreError, match="no-such-bucket-here"):
        store.publish(DatasetManifest(name="x"), _artifact(tmp_path), ref="runs/r/x")
    with pytest.raises(StoreError, match="no-such-bucket-here"):
        store.fetch("runs/r/x")
    names = [b["Name"] for b in seaweed.client().list_buckets().get("Buckets", [])]
    assert "no-such-bucket-here" not in names


def test_unreachable_endpoint_is_named(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    store = ArtifactStore("s3://some-bucket/x", endpoint_url=endpoint, key="k", secret="s")
    with pytest.raises(StoreError, match=f"cannot reach S3 endpoint {endpoint}"):
        store.check_reachable()


def test_s3_url_must_not_carry_credentials() -> None:
    with pytest.raises(StoreError, match="must not carry credentials") as err:
        ArtifactStore("s3://AKEY:SUPERSECRET@bucket/x")
    assert "SUPERSECRET" not in str(err.value)


def test_local_store_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        ArtifactStore((tmp_path / "f").as_uri()).check_reachable()


def test_aiobotocore_data_path_round_trips(seaweed, s3_bucket: str, tmp_path: Path) -> None:  # noqa: ANN001
    """The aiobotocore data path (chosen with data_path="aiobotocore") round-trips and verifies too."""
    import filecmp
    import os

    src = tmp_path / "src"
    src.mkdir()
    (src / "small.txt").write_text("hello")
    with open(src / "big.bin", "wb") as fh:  # multipart: several parts
        for _ in range(3):
            fh.write(os.urandom(6 << 20))
    opts = {
        "endpoint_url": seaweed.endpoint_url,
        "key": seaweed.access_key,
        "secret": seaweed.secret_key,
        "data_path": "aiobotocore",
    }
    store = ArtifactStore(f"s3://{s3_bucket}/p", cache_dir=tmp_path / "cache", **opts)
    m = store.publish(DatasetManifest(name="slow-path"), src, ref="runs/r/x")
    assert store._backend._obs is None
    out = store.fetch("runs/r/x")
    assert filecmp.cmp(out / "big.bin", src / "big.bin", shallow=False) and store.verify().ok
    entry = m.files["big.bin"]
    seaweed.client().put_object(
        Bucket=s3_bucket, Key=f"p/blobs/{entry.sha256[:2]}/{entry.sha256}", Body=b"x" * 10
    )
    other = ArtifactStore(f"s3://{s3_bucket}/p", cache_dir=tmp_path / "cache2", **opts)
    with pytest.raises(StoreError, match=r"slow-path.*big\.bin"):
        other.fetch("runs/r/x")


def test_obstore_data_path_with_a_small_part_size(seaweed, s3_bucket: str, tmp_path: Path) -> None:  # noqa: ANN001
    """Small, single-part and multipart files through obstore with 5 MiB parts; a short blob is refused."""
    import filecmp
    import os

    src = tmp_path / "src"
    src.mkdir()
    for name, size in (("small.txt", 5), ("empty.bin", 0), ("mid.bin", 7 << 20), ("big.bin", 17 << 20)):
        (src / name).write_bytes(os.urandom(size))
    opts = {"endpoint_url": seaweed.endpoint_url, "key": seaweed.access_key, "secret": seaweed.secret_key}
    store = ArtifactStore(f"s3://{s3_bucket}/p", cache_dir=tmp_path / "cache", part_size=5 << 20, **opts)
    m = store.publish(DatasetManifest(name="parts"), src, ref="runs/r/x")
    assert store._backend._obs is not None
    out = store.fetch("runs/r/x")
    for name in ("small.txt", "empty.bin", "mid.bin", "big.bin"):
        assert filecmp.cmp(out / name, src / name, shallow=False), name
    entry = m.files["big.bin"]
    key = f"p/blobs/{entry.sha256[:2]}/{entry.sha256}"
    seaweed.client().put_object(Bucket=s3_bucket, Key=key, Body=b"x" * (12 << 20))
    other = ArtifactStore(f"s3://{s3_bucket}/p", cache_dir=tmp_path / "cache2", part_size=5 << 20, **opts)
    with pytest.raises(StoreError, match=r"parts.*big\.bin.*shorter"):
        other.fetch("runs/r/x")
    with pytest.raises(StoreError, match="5 MiB"):
        ArtifactStore(f"s3://{s3_bucket}/p", part_size=1 << 20, **opts)


def _filer_status(url: str, data: bytes | None = None) -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, method="PUT" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_seaweed_filer_refuses_unsigned_requests(seaweed, s3_bucket: str, tmp_path: Path) -> None:  # noqa: ANN001
    """Only the S3 keys reach the objects: the filer HTTP API wants a signed JWT."""
    import stat

    store = ArtifactStore(
        f"s3://{s3_bucket}/p",
        endpoint_url=seaweed.endpoint_url,
        key=seaweed.access_key,
        secret=seaweed.secret_key,
        cache_dir=tmp_path / "cache",
    )
    m = store.publish(DatasetManifest(name="x"), _artifact(tmp_path), ref="runs/r/x")
    filer = f"http://127.0.0.1:{seaweed.ports['filer.port']}/buckets/{s3_bucket}/p"
    assert _filer_status(f"{filer}/refs/runs/r/x.json") == 401
    assert _filer_status(f"{filer}/refs/") == 401
    assert _filer_status(f"{filer}/refs/runs/r/x.json", data=b'{"digest": "0"}') == 401
    head = seaweed.client().head_object(Bucket=s3_bucket, Key="p/refs/runs/r/x.json")  # S3 still works
    assert head["ContentLength"] > 0
    fresh = ArtifactStore(
        store.url,
        endpoint_url=seaweed.endpoint_url,
        key=seaweed.access_key,
        secret=seaweed.secret_key,
        cache_dir=tmp_path / "cache2",
    )
    assert fresh._read_ref("runs/r/x") == m.digest
    assert (fresh.fetch("runs/r/x") / "a.txt").read_text() == "hello"
    security = seaweed.data_dir / "security.toml"
    assert stat.S_IMODE(security.stat().st_mode) == 0o600
    assert "[jwt.filer_signing]" in security.read_text() and "[jwt.signing.read]" in security.read_text()


def test_s3_reprs_and_messages_hide_keys_token_and_endpoint_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vinasmol_core.store.backends.s3_common import s3_error

    key, secret, token = "AKIAREPRKEY123", "repr-secret-Zq9Xv3/abc", "session-token-Tk77"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://svc:endpoint-pass-P4@127.0.0.1:{port}"
    store = ArtifactStore("s3://bucket/p", endpoint_url=endpoint, cache_dir=tmp_path / "c")
    target = store._backend.target
    hidden = [key, secret, token, "endpoint-pass-P4"]
    shown = [repr(store), repr(store._backend), repr(target), str(target)]
    assert all(f"127.0.0.1:{port}" in text for text in shown)
    assert not [(text, s) for text in shown for s in hidden if s in text]
    assert not [s for s in hidden if s in target.scrub(f"signed {key} {secret} {token} at {endpoint}/x")]
    with pytest.raises(StoreError) as err:
        store.check_reachable()
    messages = [str(err.value), str(s3_error(target, ConnectionError(f"to {endpoint}"), "read"))]
    assert all("cannot reach S3 endpoint" in m and f"127.0.0.1:{port}" in m for m in messages)
    assert not [(m, s) for m in messages for s in hidden if s in m]


def test_s3_credentials_from_a_profile_are_scrubbed(
    seaweed, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    creds = tmp_path / "credentials"
    creds.write_text(
        f"[vs]\naws_access_key_id = {seaweed.access_key}\naws_secret_access_key = {seaweed.secret_key}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "vs")
    store = ArtifactStore(f"s3://{s3_bucket}/p", endpoint_url=seaweed.endpoint_url, cache_dir=tmp_path / "c")
    store.check_reachable()  # the session found the profile's keys
    text = store._backend.target.scrub(f"failed with {seaweed.access_key} / {seaweed.secret_key}")
    assert seaweed.secret_key not in text and seaweed.access_key not in text
    assert seaweed.secret_key not in repr(store._backend.target)
