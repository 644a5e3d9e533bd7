"""Benchmark: publish and fetch a 1 GB artifact (4 x 256 MB random files) through the artifact store on a
local SeaweedFS server, against `aws s3 cp --recursive` moving the same files to and from the same server,
and against `cp -r` on local disk (the ceiling).

    python bench/store_bench.py [--files 4] [--size-mb 256] [--workers 8] [--part-mb 8]

Our publish includes hashing every file (sha256) and checking which blobs the store lacks; our fetch
includes verifying every sha256 and the atomic rename into the cache. awscli does neither (it checks
transfer checksums only) and its times include its own start (printed separately).

Ratios (last line), from one run:
    publish_vs_awscli = awscli upload time / our publish time     (> 1: we are faster)
    fetch_vs_awscli   = awscli download time / our fetch time     (> 1: we are faster)
    publish_vs_cp     = cp time / our publish time                (1.0 would be local-disk copy speed)
    fetch_vs_cp       = cp time / our fetch time

`--data` is accepted for uniformity with the other benchmarks and unused: the files are random bytes
generated in a temporary folder.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vinasmol_core.common.manifests import DatasetManifest  # noqa: E402
from vinasmol_core.localserver.seaweed import start_seaweed  # noqa: E402
from vinasmol_core.store import PART_SIZE, ArtifactStore  # noqa: E402

MB = 1 << 20


def generate(folder: Path, files: int, size_mb: int) -> int:
    """`files` files of `size_mb` MB of os.urandom bytes, written 8 MB at a time."""
    folder.mkdir(parents=True)
    for i in range(files):
        with open(folder / f"shard-{i:02d}.bin", "wb") as fh:
            for _ in range(size_mb // 8):
                fh.write(os.urandom(8 * MB))
            if size_mb % 8:
                fh.write(os.urandom((size_mb % 8) * MB))
    return files * size_mb * MB


CPU: dict[str, tuple[float, float]] = {}  # label -> (client CPU s, server CPU s)
SERVER_PID: list[int] = []


def _server_cpu() -> float:
    if not SERVER_PID:
        return 0.0
    fields = Path(f"/proc/{SERVER_PID[0]}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _client_cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(label: str, fn, *args, **kwargs) -> tuple[float, object]:  # noqa: ANN001
    """Wall time of fn(*args); client and server CPU seconds go to CPU[label]."""
    c0, s0 = _client_cpu(), _server_cpu()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    wall = time.perf_counter() - t0
    CPU[label] = (_client_cpu() - c0, _server_cpu() - s0)
    return wall, out


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")


def same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names
    )


DATA_PATHS = ("obstore", "aiobotocore")  # the store's S3 data paths compared; the first is the default


def store_options(path: str, part_size: int) -> dict[str, object]:
    """Constructor options selecting a data path and the multipart part size."""
    return {"data_path": path, "part_size": part_size}


def keep_best(slot: dict[str, tuple[float, str]], what: str, t: float, label: str) -> None:
    if what not in slot or t < slot[what][0]:
        slot[what] = (t, label)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="unused (random files are generated)")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8, help="parallel part transfers of the store")
    parser.add_argument("--part-mb", type=int, default=PART_SIZE // MB, help="multipart part size")
    parser.add_argument("--rounds", type=int, default=2, help="publish+fetch rounds per data path")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()

    aws = shutil.which("aws", path=str(Path(sys.executable).parent)) or shutil.which("aws")
    if aws is None:
        raise SystemExit("awscli not found: pip install awscli (it is in the test extra)")
    work = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.workdir))
    server = None
    try:
        src = work / "src"
        total = generate(src, args.files, args.size_mb)
        server = start_seaweed(work / "seaweed", buckets=("bench",))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(server.env())
        awsargs = ["--endpoint-url", server.endpoint_url, "--only-show-errors"]

        SERVER_PID.append(server.process.pid)
        t_aws_start, _ = timed("start", run, [aws, "--version"], env)
        t_cp, _ = timed("cp", run, ["cp", "-r", str(src), str(work / "cp-copy")])
        up_cmd = [aws, "s3", "cp", "--recursive", str(src), "s3://bench/aws/", *awsargs]
        t_aws_up, _ = timed("aws-up", run, up_cmd, env)

        def open_store(path: str, rnd: int) -> ArtifactStore:
            return ArtifactStore(
                f"s3://bench/store-{path}-{rnd}",
                endpoint_url=server.endpoint_url,
                key=server.access_key,
                secret=server.secret_key,
                cache_dir=work / f"cache-{path}-{rnd}",
                max_workers=args.workers,
                **store_options(path, args.part_mb * MB),
            )

        best: dict[str, dict[str, tuple[float, str]]] = {p: {} for p in DATA_PATHS}
        ok = True
        for rnd in range(args.rounds):  # alternate the order so that neither path always goes first
            for path in DATA_PATHS if rnd % 2 == 0 else DATA_PATHS[::-1]:
                st = open_store(path, rnd)
                label = f"publish-{path}-{rnd}"
                t, manifest = timed(label, st.publish, DatasetManifest(name="bench-1gb"), src, "bench/latest")
                keep_best(best[path], "publish", t, label)
                st = open_store(path, rnd)
                label = f"fetch-{path}-{rnd}"
                t, fetched = timed(label, st.fetch, manifest.digest)
                keep_best(best[path], "fetch", t, label)
                ok = ok and same_tree(src, fetched)
                shutil.rmtree(work / f"cache-{path}-{rnd}", ignore_errors=True)
        down_cmd = [aws, "s3", "cp", "--recursive", "s3://bench/aws/", str(work / "aws-down"), *awsargs]
        t_aws_down, _ = timed("aws-down", run, down_cmd, env)
        ok = ok and same_tree(src, work / "aws-down")
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if not ok:
        raise SystemExit("store_bench: fetched files differ from the source")

    mb = total / MB
    rows = [
        ("local disk", "cp -r", t_cp, "cp"),
        ("upload", "aws s3 cp --recursive", t_aws_up, "aws-up"),
        *(
            ("upload", f"store.publish [{p}] (sha256 + upload)", *best[p]["publish"])
            for p in DATA_PATHS
        ),
        ("download", "aws s3 cp --recursive", t_aws_down, "aws-down"),
        *(("download", f"store.fetch [{p}] (download + verify)", *best[p]["fetch"]) for p in DATA_PATHS),
    ]
    t_pub, t_fetch = best[DATA_PATHS[0]]["publish"][0], best[DATA_PATHS[0]]["fetch"][0]
    t_alt_pub, t_alt_fetch = best[DATA_PATHS[1]]["publish"][0], best[DATA_PATHS[1]]["fetch"][0]
    print(
        f"{args.files} files x {args.size_mb} MB = {mb:.0f} MB; SeaweedFS on 127.0.0.1; "
        f"workers={args.workers}, "
        f"part={args.part_mb} MB; best of {args.rounds} rounds per data path; "
        f"cpus={os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(f"awscli start-up alone (aws --version): {t_aws_start:.2f} s (included in its times)")
    print(
        f"| {'operation':<10} | {'tool':<46} | {'seconds':>8} | {'MB/s':>7} "
        f"| {'client CPU s':>12} | {'server CPU s':>12} |"
    )
    print(f"|{'-' * 12}|{'-' * 48}|{'-' * 10}|{'-' * 9}|{'-' * 14}|{'-' * 14}|")
    for op, tool, t, label in rows:
        cc, sc = CPU[label]
        print(f"| {op:<10} | {tool:<46} | {t:8.2f} | {mb / t:7.0f} | {cc:12.2f} | {sc:12.2f} |")
    print(
        f"store_bench: publish_vs_awscli={t_aws_up / t_pub:.2f} fetch_vs_awscli={t_aws_down / t_fetch:.2f} "
        f"publish_vs_cp={t_cp / t_pub:.2f} fetch_vs_cp={t_cp / t_fetch:.2f} "
        f"{DATA_PATHS[0]}_vs_{DATA_PATHS[1]}_publish={t_alt_pub / t_pub:.2f} "
        f"{DATA_PATHS[0]}_vs_{DATA_PATHS[1]}_fetch={t_alt_fetch / t_fetch:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
