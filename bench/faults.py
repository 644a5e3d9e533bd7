"""The whole pipeline under faults: the tiny recipe run undisturbed once (the reference), then once per
fault from a fresh store, recovered the way a user would, and compared by content.

    python bench/faults.py [--seed 0] [--rows 1,3,5,6,7,8,9] [--work DIR] [--recipe recipes/tiny-cpu.yaml]

"Same digests" means the sha256 of the final checkpoint's `lit_model.pth` and of every file of the HF
export (manifest digests carry creation times). Every `vinasmol run` is started in a session of its
own, the way a user's shell would, with its own temporary Prefect server; after it ends, any process
left in that session, or any stage process of it, is an orphan.

| row | fault | recovery |
| --- | --- | --- |
| 1 | SIGKILL of `vinasmol run` at a random moment inside each step in turn | the same command again |
| 2 | SIGKILL of a stage's training process inside a deployment run | none: the parent's retry |
| 3 | SeaweedFS SIGKILLed during a stage's publishes, back 10 s later | its retries, else a re-run |
| 4 | the Prefect server SIGKILLed during a stage, back 10 s later on its database | none, else a re-run |
| 5 | the scratch disk (a small tmpfs: `TMPDIR`, work folder) full as a stage starts | free it, re-run |
| 6 | a blob of a finished checkpoint corrupted (one byte flipped), another blob deleted | re-run; verify |
| 7 | two `vinasmol run` of the recipe on one store at the same time | none |
| 8 | the S3 server paused (SIGSTOP) for 30 s during a stage, then SIGCONT | none |
| 9 | SIGTERM to a training stage's process (a pod being evicted) | a re-run resumes |

Row 2 starts the local stack (`make up`: Prefect server, SeaweedFS, a process worker per pool) and
runs `vinasmol/full-cpt` with each stage a child run; row 4 restarts a Prefect server of the bench's
own (SQLite) that the run talks to. The seed
chooses every kill moment and is printed. Ends with
`faults: injected=N survived=N identical=N lost=N orphans=N seed=S`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # ui_shots: the local stack's helpers

from vinasmol_core.model.hf_io import sha256_file  # noqa: E402

TAG_ENV = "VINASMOL_FAULTS_RUN"
# Steps of the tiny recipe that row 1 kills inside (in flow order).
KILL_STEPS = (
    "train-tokenizer", "merge-vocabulary", "prepare-data-main", "init-embeddings", "convert-to-litgpt",
    "train-stage-eeve-3", "evaluate-eeve-3", "train-stage-eeve-4", "train-stage-eeve-6", "train-stage-eeve-7",
    "train-stage-context-extension", "train-stage-annealing", "export",
)


@dataclass
class Run:
    """One `vinasmol run`: exit status, output, wall time, the steps it executed, orphans left."""

    rc: int
    out: str
    wall: float
    executed: list[str]
    orphans: list[str]

    def outputs(self) -> tuple[str, str] | None:
        """(final checkpoint digest, export digest) printed at the end of a successful run."""
        lines = {ln.split(":", 1)[0]: ln for ln in self.out.splitlines() if ":" in ln}
        try:
            ckpt = lines["final checkpoint"].rsplit("(", 1)[1].rstrip(")")
            export = lines["HF export"].rsplit("(", 1)[1].rstrip(")")
        except (KeyError, IndexError):
            return None
        return ckpt, export


@dataclass
class Row:
    number: int
    fault: str
    injected: int = 0
    survived: bool = False
    identical: bool = False
    lost: int = 0
    orphans: int = 0
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, work: Path, recipe: Path, seed: int) -> None:
        self.work, self.recipe, self.rng = work, recipe, random.Random(seed)
        self.reference: dict[str, str] | None = None
        self.durations: dict[str, float] = {}

    # ------------------------------------------------------------------ running the pipeline
    def env(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        base = self.work / name
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "AWS_"))}
        env.update(
            PREFECT_HOME=str(base / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_LEVEL="WARNING", VINASMOL_WORK_DIR=str(base / "work"),
            VINASMOL_CACHE=str(base / "cache"), VINASMOL_TIMING_LOG=str(base / "timing.jsonl"),
            TQDM_DISABLE="1", HF_HUB_OFFLINE="1",
        )
        env.update(extra or {})
        env[TAG_ENV] = f"{name}-{uuid.uuid4().hex}"  # every process of this run inherits it: the orphan check
        return env

    def run(
        self, name: str, store: str, *, extra_env: dict[str, str] | None = None,
        during: Callable[[subprocess.Popen[str], Path], None] | None = None, args: tuple[str, ...] = (),
    ) -> Run:
        """`vinasmol run RECIPE --store STORE` in a session of its own; `during(proc, timing_log)`
        runs in a thread while it does (to inject a fault)."""
        env = self.env(name, extra_env)
        log = Path(env["VINASMOL_TIMING_LOG"])
        before = len(_timing(log))
        cmd = [sys.executable, "-c", "from flows.cli import console; console()", "run", str(self.recipe),
               "--store", store, "--stage-runner", "inline", *args]
        t0 = time.perf_counter()
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            injector = None
            if during is not None:
                injector = threading.Thread(target=during, args=(proc, log), daemon=True)
                injector.start()
            rc = proc.wait()
            if injector is not None:
                injector.join(timeout=120)
            out.seek(0)
            text = out.read()
        wall = time.perf_counter() - t0
        executed = [r["name"] for r in _timing(log)[before:] if r["ok"]]
        return Run(rc, text, wall, executed, _orphans(env[TAG_ENV]))

    def content(
        self, store: str, outputs: tuple[str, str], extra_env: dict[str, str] | None = None
    ) -> dict[str, str]:
        """sha256 of the final checkpoint's weights and of every file of the HF export."""
        from vinasmol_core.store import ArtifactStore

        saved = dict(os.environ)
        os.environ.update(extra_env or {})
        try:
            st = ArtifactStore(store)
            ckpt, export = (Path(st.fetch(d)) for d in outputs)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        hashes = {"checkpoint/lit_model.pth": sha256_file(ckpt / "lit_model.pth")}
        for f in sorted(export.rglob("*")):
            if f.is_file():
                hashes[f"export/{f.relative_to(export)}"] = sha256_file(f)
        return hashes

    def verify(self, store: str, extra_env: dict[str, str] | None = None) -> list[str]:
        from vinasmol_core.store import ArtifactStore

        saved = dict(os.environ)
        os.environ.update(extra_env or {})
        try:
            return ArtifactStore(store).verify().problems
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def finish(self, row: Row, name: str, store: str, run: Run, extra_env: dict[str, str] | None = None,
               rerun_note: str = "re-run") -> Run:
        """Re-run once if the run failed (the user's recovery), then compare with the reference."""
        if run.rc != 0:
            row.notes.append(f"failed: {_last_error(run.out)}; {rerun_note}")
            row.orphans += len(run.orphans)
            run = self.run(name, store, extra_env=extra_env)
        row.orphans += len(run.orphans)
        outputs = run.outputs()
        row.survived = run.rc == 0 and outputs is not None
        if not row.survived:
            row.notes.append(f"recovery failed: {_last_error(run.out)}")
            return run
        assert outputs is not None and self.reference is not None
        got = self.content(store, outputs, extra_env)
        row.identical = got == self.reference
        if not row.identical:
            differ = [k for k in self.reference if got.get(k) != self.reference[k]]
            row.notes.append("differs: " + ", ".join(differ))
        problems = self.verify(store, extra_env)
        row.lost = len(problems)
        row.notes.extend(f"verify: {p}" for p in problems[:3])
        return run

    # ------------------------------------------------------------------ reference
    def make_reference(self) -> None:
        store = _file_store(self.work / "reference" / "store")
        run = self.run("reference", store)
        if run.rc != 0 or run.outputs() is None:
            raise SystemExit(f"the undisturbed run failed:\n{run.out[-3000:]}")
        self.reference = self.content(store, run.outputs())  # type: ignore[arg-type]
        for r in _timing(self.work / "reference" / "timing.jsonl"):
            self.durations[r["name"]] = r["duration_s"]
        weights = self.reference["checkpoint/lit_model.pth"][:16]
        print(f"reference: {run.wall:.0f} s, {len(run.executed)} steps, lit_model.pth {weights}, "
              f"{len(self.reference) - 1} export files", flush=True)

    def moment(self, step: str) -> float:
        """A random moment inside `step`: seconds after it starts (10-70 % of its reference time)."""
        return self.rng.uniform(0.1, 0.7) * self.durations.get(step, 1.0)

    # ------------------------------------------------------------------ rows
    def row1(self) -> Row:
        row = Row(1, "SIGKILL of `vinasmol run` inside each step in turn")
        store = _file_store(self.work / "row1" / "store")
        order = [n for n in self.durations]  # executed steps of the reference, in the order they ended
        killed_in: list[str] = []
        for target in KILL_STEPS:
            prev = order[order.index(target) - 1] if order.index(target) > 0 else None
            delay = self.moment(target)

            def kill(
                proc: subprocess.Popen[str], log: Path, prev: str | None = prev, delay: float = delay
            ) -> None:
                # start the clock when the step before the target ends in this attempt (if an earlier
                # attempt finished it, it is cached: then when this attempt's first step ends)
                start = len(_timing(log))
                cached = prev is not None and any(r["name"] == prev and r["ok"] for r in _timing(log))
                while proc.poll() is None:
                    names = [r["name"] for r in _timing(log)[start:]]
                    if prev is None or (prev in names if not cached else bool(names)):
                        break
                    time.sleep(0.05)
                time.sleep(delay)
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)

            run = self.run("row1", store, during=kill)
            row.injected += 1
            row.orphans += len(run.orphans)
            if run.orphans:
                row.notes.append(f"orphans after a kill in {target}: {run.orphans[:2]}")
            done = {r["name"] for r in _timing(self.work / "row1" / "timing.jsonl") if r["ok"]}
            interrupted = next((s for s in order if s not in done), "none (the run had finished)")
            killed_in.append(interrupted)
            print(f"  row 1: kill aimed at {target} after {delay:.2f} s: interrupted {interrupted} "
                  f"(rc {run.rc}, {run.wall:.0f} s)", flush=True)
        final = self.run("row1", store)
        self.finish(row, "row1", store, final)
        executed = [r["name"] for r in _timing(self.work / "row1" / "timing.jsonl") if r["ok"]]
        twice = sorted({n for n in executed if executed.count(n) > 1})
        if twice:
            row.notes.append(f"finished steps recomputed: {twice}")
            row.identical = False
        row.notes.append(f"interrupted: {', '.join(dict.fromkeys(killed_in))}")
        return row

    def row9(self) -> Row:
        row = Row(9, "SIGTERM to a training stage's process")
        store = _file_store(self.work / "row9" / "store")
        target = "train-stage-eeve-6"

        def term(proc: subprocess.Popen[str], log: Path) -> None:
            while proc.poll() is None and not _finished(log, "evaluate-eeve-4"):
                time.sleep(0.05)
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                pids = _stage_processes(proc.pid)
                if pids:
                    time.sleep(self.moment(target) / 2)
                    for pid in _stage_processes(proc.pid):
                        os.kill(pid, signal.SIGTERM)
                    return
                time.sleep(0.05)

        run = self.run("row9", store, during=term)
        row.injected = 1
        if "stopped by SIGTERM after step" in run.out:
            row.notes.append(_last_error(run.out))
        else:
            row.notes.append(f"no graceful stop seen (rc {run.rc})")
        final = self.finish(row, "row9", store, run)
        resumed = [ln for ln in final.out.splitlines() if "resum" in ln.lower()][:1]
        row.notes.extend(resumed)
        return row

    def row6(self) -> Row:
        row = Row(6, "a blob flipped, another deleted")
        dst = self.work / "row6" / "store"
        shutil.copytree(self.work / "reference" / "store", dst)  # a finished run's store
        store = _file_store(dst)
        from vinasmol_core.store import ArtifactStore

        st = ArtifactStore(store)
        shas = [st.get_manifest(ref).files["lit_model.pth"].sha256 for ref in ("runs/tiny-cpu/eeve-6",
                                                                              "runs/tiny-cpu/eeve-7")]
        flipped, deleted = (dst / "blobs" / _blob_path(sha) for sha in shas)
        data = bytearray(flipped.read_bytes())
        data[len(data) // 2] ^= 0xFF
        flipped.chmod(0o644)
        flipped.write_bytes(bytes(data))
        deleted.unlink()
        row.injected = 2
        problems = self.verify(store)
        named = sum(any(sha in p for p in problems) for sha in shas)
        row.notes.append(f"verify names {named} of 2 damaged blobs")
        run = self.run("row6", store, args=("--force", "eeve-7"))  # eeve-7 reads eeve-6's checkpoint
        told = "verify --repair" in run.out and shas[0] in run.out
        row.notes.append(f"re-run of eeve-7: rc {run.rc}, error names the blob and the repair: {told}")
        removed = ArtifactStore(store).verify(repair=True).removed
        row.notes.append(f"verify --repair removed {len(removed)} blob(s); then --force eeve-6")
        self.finish(row, "row6", store, self.run("row6", store, args=("--force", "eeve-6")))
        return row

    def row2(self) -> Row:
        row = Row(2, "SIGKILL of a stage's training process inside a deployment run")
        import ui_shots

        base = self.work / "row2"
        base.mkdir(parents=True)
        env = {**os.environ, "VINASMOL_STACK_DIR": str(base / "stack"), "PYTHONPATH": str(ROOT)}
        port = ui_shots.free_port()
        ui_shots.stack_cmd("up", env, port)  # `make up`: Prefect server, SeaweedFS, both pools' workers
        try:
            state = json.loads((base / "stack" / "stack.json").read_text())
            creds = json.loads((base / "stack" / "s3-credentials.json").read_text())
            s3 = {"AWS_ACCESS_KEY_ID": creds["access_key"], "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
                  "AWS_ENDPOINT_URL": state["s3_endpoint"], "AWS_DEFAULT_REGION": "us-east-1"}
            store = "s3://vinasmol/store"
            killed: list[str] = []
            from vinasmol_core.store import ArtifactStore

            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            partials = ArtifactStore(store, endpoint_url=s3["AWS_ENDPOINT_URL"], key=s3["AWS_ACCESS_KEY_ID"],
                                     secret=s3["AWS_SECRET_ACCESS_KEY"])

            def kill_stage() -> None:
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    for pid, _, _, cmd in _proc_table():
                        if "vinasmol_core.train" in cmd and "--job" in cmd:
                            try:
                                job = json.loads(Path(cmd.split("--job")[1].split()[0]).read_text())
                            except (OSError, ValueError, IndexError):
                                continue
                            if job["spec"]["name"] == "eeve-6":
                                # once the stage has a train-state, so that the retry has one to resume
                                while not partials.list_refs("partial/eeve-6/"):
                                    time.sleep(0.05)
                                time.sleep(self.rng.uniform(0.0, 0.5))
                                os.kill(pid, signal.SIGKILL)
                                killed.append(f"pid {pid}")
                                return
                    time.sleep(0.05)

            from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

            injector = threading.Thread(target=kill_stage, daemon=True)
            injector.start()
            auth = (base / "stack" / "prefect-auth").read_text().strip()
            with temporary_settings({PREFECT_API_URL: state["api_url"], PREFECT_API_AUTH_STRING: auth}):
                parent = ui_shots.run_parent(self.recipe, 1800)
            injector.join(timeout=5)
            row.injected = len(killed)
            row.notes.append(f"eeve-6's training process killed: {bool(killed)}; parent {parent.state.name}")
            row.survived = parent.state.is_completed()
            if row.survived:
                saved = dict(os.environ)
                os.environ.update(s3)
                try:
                    st = ArtifactStore(store)
                    outputs = (st.resolve("runs/tiny-cpu/annealing"), st.resolve("runs/tiny-cpu/export"))
                    resumed = st.get_manifest("runs/tiny-cpu/eeve-6").extra.get("resumed_from_step")
                finally:
                    os.environ.clear()
                    os.environ.update(saved)
                row.notes.append(f"eeve-6 resumed from step {resumed}")
                row.identical = self.content(store, outputs, s3) == self.reference
                problems = self.verify(store, s3)
                row.lost = len(problems)
                row.notes.extend(f"verify: {p}" for p in problems[:3])
            row.orphans = sum("vinasmol_core.train" in cmd for _, _, _, cmd in _proc_table())
        finally:
            ui_shots.stack_cmd("down", env, port)
        return row

    def row3(self) -> Row:
        row = Row(3, "SeaweedFS killed during a stage's publishes, restarted 10 s later")
        with self.seaweed("row3") as (server, env):
            store = server.store_url("vinasmol", "row3")
            holder = {"server": server}

            def outage(proc: subprocess.Popen[str], log: Path) -> None:
                while proc.poll() is None and not _finished(log, "evaluate-eeve-3"):
                    time.sleep(0.05)
                time.sleep(self.moment("train-stage-eeve-4"))
                if proc.poll() is not None:
                    return
                holder["server"].process.kill()
                holder["server"].process.wait()
                time.sleep(10)
                holder["server"] = self.restart_seaweed(holder["server"])

            run = self.run("row3", store, extra_env=env, during=outage)
            row.injected = 1
            self.finish(row, "row3", store, run, extra_env=env)
            holder["server"].stop()
        return row

    def row8(self) -> Row:
        row = Row(8, "the S3 server paused (SIGSTOP) 30 s during a stage")
        with self.seaweed("row8") as (server, env):
            store = server.store_url("vinasmol", "row8")

            def pause(proc: subprocess.Popen[str], log: Path) -> None:
                while proc.poll() is None and not _finished(log, "evaluate-eeve-3"):
                    time.sleep(0.05)
                time.sleep(self.moment("train-stage-eeve-4"))
                if proc.poll() is None:
                    os.killpg(server.process.pid, signal.SIGSTOP)
                    time.sleep(30)
                    os.killpg(server.process.pid, signal.SIGCONT)

            run = self.run("row8", store, extra_env=env, during=pause)
            row.injected = 1
            self.finish(row, "row8", store, run, extra_env=env)
        return row

    def row7(self) -> Row:
        row = Row(7, "two `vinasmol run` on one store at once")
        store = _file_store(self.work / "row7" / "store")
        results: dict[str, Run] = {}
        threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, self.run(n, store)))
                   for n in ("row7a", "row7b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        row.injected = 1
        ok = {n: r.rc == 0 and r.outputs() is not None for n, r in results.items()}
        row.survived = all(ok.values())
        row.orphans = sum(len(r.orphans) for r in results.values())
        same = []
        for name, run in results.items():
            if ok[name]:
                same.append(self.content(store, run.outputs()) == self.reference)  # type: ignore[arg-type]
            else:
                row.notes.append(f"{name} failed: {_last_error(run.out)}")
        row.identical = row.survived and all(same)
        problems = self.verify(store)
        row.lost = len(problems)
        row.notes.extend(f"verify: {p}" for p in problems[:3])
        row.notes.append(f"walls {results['row7a'].wall:.0f} s and {results['row7b'].wall:.0f} s")
        return row

    def row5(self) -> Row:
        row = Row(5, "scratch disk full when a stage starts")
        scratch = self.work / "row5" / "scratch"
        scratch.mkdir(parents=True)
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(scratch)],
                               capture_output=True, text=True)
        if mount.returncode != 0:
            row.notes.append(f"not run: a tmpfs needs root ({mount.stderr.strip()})")
            return row
        try:
            env = {"TMPDIR": str(scratch), "VINASMOL_WORK_DIR": str(scratch / "work")}
            store = _file_store(self.work / "row5" / "store")
            filler = scratch / "filler"

            def fill(proc: subprocess.Popen[str], log: Path) -> None:
                while proc.poll() is None and not _finished(log, "evaluate-eeve-4"):
                    time.sleep(0.05)
                with open(filler, "wb") as fh:  # leave ~200 KB: the next checkpoint does not fit
                    free = shutil.disk_usage(scratch).free
                    fh.write(b"\0" * max(0, free - 200_000))

            run = self.run("row5", store, extra_env=env, during=fill)
            row.injected = 1
            row.notes.append(f"rc {run.rc}: {_last_error(run.out)[:240]}")
            problems = self.verify(store)
            row.notes.append(f"store after the failure: {len(problems)} problem(s)")
            filler.unlink(missing_ok=True)
            self.finish(row, "row5", store, self.run("row5", store, extra_env=env))
        finally:
            subprocess.run(["umount", str(scratch)], check=False)
        return row

    def row4(self) -> Row:
        row = Row(4, "the Prefect server killed during a stage, restarted 10 s later")
        from vinasmol_core.localserver.localhost import free_ports, http_ok

        home, port = self.work / "row4" / "server", free_ports(1)[0]
        home.mkdir(parents=True)
        url = f"http://127.0.0.1:{port}/api"

        def serve() -> subprocess.Popen[bytes]:
            env = {**self.env("row4"), "PREFECT_HOME": str(home)}
            env.pop(TAG_ENV)  # the bench's server, not the run's
            log = open(home / "server.log", "ab")  # noqa: SIM115 - the server's for its lifetime
            cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                   "--port", str(port), "--no-services", "--no-ui"]
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            deadline = time.monotonic() + 180
            while not http_ok(f"{url}/health"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the Prefect server did not start; see {home / 'server.log'}")
                time.sleep(0.2)
            return proc

        servers = [serve()]
        store = _file_store(self.work / "row4" / "store")

        def outage(proc: subprocess.Popen[str], log: Path) -> None:
            while proc.poll() is None and not _finished(log, "evaluate-eeve-3"):
                time.sleep(0.05)
            time.sleep(self.moment("train-stage-eeve-4"))
            if proc.poll() is None:
                os.killpg(servers[0].pid, signal.SIGKILL)
                servers[0].wait()
                time.sleep(10)
                servers.append(serve())

        try:
            run = self.run("row4", store, extra_env={"PREFECT_API_URL": url}, during=outage)
            row.injected = 1
            self.finish(row, "row4", store, run, extra_env={"PREFECT_API_URL": url})
        finally:
            for srv in servers:
                if srv.poll() is None:
                    os.killpg(srv.pid, signal.SIGKILL)
                    srv.wait()
        return row

    # ------------------------------------------------------------------ an S3 server
    def seaweed(self, name: str) -> Any:
        from contextlib import contextmanager

        from vinasmol_core.localserver.seaweed import start_seaweed

        @contextmanager
        def server() -> Any:
            srv = start_seaweed(self.work / name / "weed", buckets=("vinasmol",), die_with_parent=True)
            try:
                yield srv, srv.env()
            finally:
                srv.stop()

        return server()

    @staticmethod
    def restart_seaweed(old: Any) -> Any:
        from vinasmol_core.localserver.seaweed import start_seaweed

        # started from the injecting thread: no parent-death signal, which would follow that thread
        return start_seaweed(old.data_dir, s3_port=old.ports["s3.port"], access_key=old.access_key,
                             secret_key=old.secret_key, die_with_parent=False)


# ---------------------------------------------------------------------------------------- helpers
def _file_store(path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    return "file://" + str(path.resolve())


def _blob_path(sha: str) -> str:
    return f"{sha[:2]}/{sha}"  # the store's blob layout (vinasmol_core.store.layout)


def _timing(log: Path) -> list[dict]:
    if not log.exists():
        return []
    rows = []
    for line in log.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return rows


def _finished(log: Path, name: str) -> bool:
    return any(r["name"] == name and r["ok"] for r in _timing(log))


def _last_error(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    return lines[-1] if lines else (out.strip().splitlines() or ["(no output)"])[-1]


def _proc_table() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, session id, command line) of every live process."""
    table = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z":
            table.append((int(entry.name), int(fields[1]), int(fields[3]), cmdline))
    return table


def _stage_processes(root: int) -> list[int]:
    """The training processes (`python -m vinasmol_core.train`) below process `root`."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, ppid, _, _ in table:
        children.setdefault(ppid, []).append(pid)
    below, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in below:
                below.add(c)
                todo.append(c)
    return [pid for pid, _, _, cmd in table if pid in below and "vinasmol_core.train" in cmd]


def _orphans(tag: str, wait: float = 15.0) -> list[str]:
    """Processes of a finished run still alive after `wait` seconds: those whose environment holds
    the run's tag (the run itself, its Prefect server, its stage processes and their workers)."""
    needle = f"{TAG_ENV}={tag}".encode()
    deadline = time.monotonic() + wait
    while True:
        left = []
        for pid, _, _, cmd in _proc_table():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle in environ:
                left.append(f"{pid} {cmd[:80]}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None, help="unused: the tiny recipe has built-in corpora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default="1,2,3,4,5,6,7,8,9")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny-cpu.yaml")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="vinasmol-faults-"))
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"--work {work}: not empty")
    print(f"seed {args.seed}, work folder {work}", flush=True)
    bench = Bench(work, args.recipe.resolve(), args.seed)
    bench.make_reference()
    rows = []
    for n in (int(x) for x in args.rows.split(",")):
        t0 = time.perf_counter()
        row = getattr(bench, f"row{n}")()
        rows.append(row)
        print(f"row {n}: {time.perf_counter() - t0:.0f} s: survived={row.survived} identical={row.identical} "
              f"lost={row.lost} orphans={row.orphans}", flush=True)
    print("\n| # | fault | injected | survived | same digests | lost | orphans | notes |")
    print("| --- | --- | ---: | --- | --- | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r.number} | {r.fault} | {r.injected} | {'yes' if r.survived else 'NO'} | "
              f"{'yes' if r.identical else 'NO'} | {r.lost} | {r.orphans} | {'; '.join(r.notes)} |")
    injected = sum(r.injected for r in rows)
    survived = sum(r.injected for r in rows if r.survived)
    identical = sum(r.injected for r in rows if r.identical)
    print(f"faults: injected={injected} survived={survived} identical={identical} "
          f"lost={sum(r.lost for r in rows)} orphans={sum(r.orphans for r in rows)} seed={args.seed}")
    return 0 if survived == identical == injected else 1


if __name__ == "__main__":
    raise SystemExit(main())
