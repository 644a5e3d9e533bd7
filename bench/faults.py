"""The whole pipeline under faults: the tiny recipe run undisturbed once (the reference), then once per
fault from a fresh store, recovered the way a user would, and compared by content.

    python bench/faults.py [--seed 0] [--rows 1,...,12] [--work DIR] [--reference DIR] [--keep]
                           [--recipe recipes/tiny-cpu.yaml]

"Same digests" means the sha256 of the final checkpoint's `lit_model.pth` and of every file of the HF
export (manifest digests carry creation times). Every `vinasmol run` is started in a session of its
own, the way a user's shell would, with its own temporary Prefect server and real stage processes
(`VINASMOL_STAGE_RUNNER=process`); after it ends, any process left in that session, or any stage
process of it, is an orphan.

| row | fault | recovery |
| --- | --- | --- |
| 1 | SIGKILL of `vinasmol run` inside each step in turn | the same command again |
| 2 | SIGKILL of a stage's training process inside a deployment run | none: the parent's retry |
| 3 | SeaweedFS SIGKILLed during a stage's publishes, back 10 s later | its retries, else a re-run |
| 4 | the Prefect server SIGKILLed during a stage, back 10 s later on its database | none, else a re-run |
| 5 | the scratch disk (a small tmpfs: `TMPDIR`, work folder) full as a stage starts | free it, re-run |
| 6 | a blob of a finished checkpoint corrupted (a byte flipped), another deleted | verify, repair, --force |
| 7 | two `vinasmol run` of the recipe on one store at the same time | none |
| 8 | the S3 server paused (SIGSTOP) for 30 s during a stage, then SIGCONT | none |
| 9 | SIGTERM to a training stage's process (a pod being evicted) | a re-run resumes |
| 10 | a training stage's rank held inside a step (it hangs), under a 20 s `step_timeout` | a re-run |
| 11 | the store's disk full during a publish (the file:// store on a small tmpfs) | free it, re-run |
| 12 | the Prefect server's database deleted, the server started again (same port) | none, else a re-run |

Moments are events, never sleeps. Row 1: a training stage holds after a seeded step
(`VINASMOL_HOLD_AT`, a named pipe) and is killed there; any other step is killed a seeded part of its
reference time after its task run started (Prefect's "Created task run" line), if it has not ended.
Rows 2, 3, 4, 8, 11 and 12 strike at a stage's first train-state (a ref under `partial/<stage>/`),
row 9 too (the stage's SIGTERM handler is in place by then), row 5 when evaluate-eeve-4 ends.

Gates beyond same digests: row 1, every kill landed inside its step and no finished step ran
again; rows 3 and 8, a store request failed and was retried (the S3 backend logs each retry), row 4
an API request (Prefect's client, at DEBUG for that run); row 6, `vinasmol store verify` names both
blobs, the fetch error names the repair and `--force` publishes new train-states; row 9, a
train-state of the stopped step, the preemption reported, and the re-run resumed from that step;
row 10, the step watchdog's message names the stage, the step and the rank, and the re-run resumed
from the newest train-state before the hung step;
row 11, a StoreError naming the full disk and `verify` clean after it.

Row 2 starts the local stack (`make up`: Prefect server, SeaweedFS, a process worker per pool) and
runs `vinasmol/full-cpt` with each stage a child run; rows 4 and 12 restart a Prefect server of the
bench's own (SQLite) that the run talks to. Rows 5 and 11 mount a tmpfs (root). The seed chooses
every kill moment and is printed; every kill prints where it landed. A row whose fault never landed
(nothing injected) fails. Ends with `faults: injected=N survived=N identical=N lost=N orphans=N seed=S`;
the exit status is 0 only if every fault was survived with the same digests, nothing was lost, no
process was orphaned and every available row injected its fault.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # ui_shots: the local stack's helpers

from vinasmol_core.model.hf_io import sha256_file  # noqa: E402
from vinasmol_core.train.hold import HOLD_ENV, HOLD_IN_STEP_ENV, StageHold  # noqa: E402
from vinasmol_core.train.process import STAGE_RUNNER_ENV  # noqa: E402

TAG_ENV = "VINASMOL_FAULTS_RUN"
RUN_NAME = "tiny-cpu"  # the recipe's name: its refs are runs/<name>/<stage>
# Steps of the tiny recipe that row 1 kills inside (in flow order).
KILL_STEPS = (
    "train-tokenizer", "merge-vocabulary", "prepare-data-main", "init-embeddings", "convert-to-litgpt",
    "train-stage-eeve-3", "evaluate-eeve-3", "train-stage-eeve-4", "train-stage-eeve-6", "train-stage-eeve-7",
    "train-stage-context-extension", "train-stage-annealing", "export",
)
STAGE_PREFIX = "train-stage-"
# What a retried request prints: the S3 backend's retry lines (WARNING), Prefect's client (DEBUG, which
# the bench turns on for the runs of rows 3, 4 and 8).
S3_RETRY = re.compile(r"S3 .*(retrying \(attempt \d+\)|trying again in)")
API_RETRY = re.compile(r"(Encountered retryable exception during request|Received response with retryable "
                       r"status code)")


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
class Live:
    """What an injector sees of a run in progress: its timing log (steps that ended) and its output."""

    timing: Path
    out_path: Path
    start: int  # timing lines before this run
    env: dict[str, str]

    def text(self) -> str:
        try:
            return self.out_path.read_text(errors="replace")
        except OSError:
            return ""

    def ended(self) -> list[dict]:
        return _timing(self.timing)[self.start:]

    def finished(self, name: str) -> bool:
        return any(r["name"] == name and r["ok"] for r in self.ended())


@dataclass
class Row:
    number: int
    fault: str
    injected: int = 0
    survived: bool = False
    identical: bool = False
    lost: int = 0
    orphans: int = 0
    available: bool = True  # False: the fault cannot be made yet (not counted, not failed)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        if not self.available:
            return True
        return self.injected > 0 and self.survived and self.identical and not self.lost and not self.orphans


def landed(row: int, text: str) -> str:
    """Print where a fault landed (and return the line for the row's notes)."""
    print(f"  row {row}: {text}", flush=True)
    return text


class Bench:
    def __init__(self, work: Path, recipe: Path, seed: int) -> None:
        self.work, self.recipe, self.rng = work, recipe, random.Random(seed)
        self.reference: dict[str, str] | None = None
        self.durations: dict[str, float] = {}
        self.steps: dict[str, int] = {}  # training stage -> its number of optimizer steps
        self.reference_store = ""

    # ------------------------------------------------------------------ running the pipeline
    def env(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        base = self.work / name
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "AWS_"))}
        env.pop(HOLD_ENV, None)
        env.pop(HOLD_IN_STEP_ENV, None)
        env.update(
            PREFECT_HOME=str(base / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_LEVEL="WARNING", VINASMOL_WORK_DIR=str(base / "work"),
            VINASMOL_CACHE=str(base / "cache"), VINASMOL_TIMING_LOG=str(base / "timing.jsonl"),
            TQDM_DISABLE="1", HF_HUB_OFFLINE="1",
            # every stage a real process of its own (the SIGTERM handler, the parent-death signal)
            **{STAGE_RUNNER_ENV: "process"},
            # "Created task run '<step>' ...": a step's start, the moment row 1 waits for
            PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL="DEBUG",
        )
        env.update(extra or {})
        env[TAG_ENV] = f"{name}-{uuid.uuid4().hex}"  # every process of this run inherits it: the orphan check
        return env

    def run(
        self, name: str, store: str, *, extra_env: dict[str, str] | None = None,
        during: Callable[[subprocess.Popen[str], Live], None] | None = None, args: tuple[str, ...] = (),
    ) -> Run:
        """`vinasmol run RECIPE --store STORE` in a session of its own; `during(proc, live)` runs in a
        thread while it does (to inject a fault)."""
        env = self.env(name, extra_env)
        log = Path(env["VINASMOL_TIMING_LOG"])
        before = len(_timing(log))
        cmd = [sys.executable, "-c", "from flows.cli import console; console()", "run", str(self.recipe),
               "--store", store, "--stage-runner", "inline", *args]
        base = self.work / name
        base.mkdir(parents=True, exist_ok=True)
        out_path = base / f"out-{uuid.uuid4().hex[:8]}.log"
        t0 = time.perf_counter()
        with open(out_path, "w+") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            injector = None
            if during is not None:
                live = Live(log, out_path, before, env)
                injector = threading.Thread(target=during, args=(proc, live), daemon=True)
                injector.start()
            rc = proc.wait()
            if injector is not None:
                injector.join(timeout=120)
            out.seek(0)
            text = out.read()
        wall = time.perf_counter() - t0
        executed = [r["name"] for r in _timing(log)[before:] if r["ok"]]
        return Run(rc, text, wall, executed, _orphans(env[TAG_ENV]))

    def cli(self, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """A `vinasmol` command (not a pipeline run), e.g. `store verify`."""
        env = {**os.environ, **(extra_env or {})}
        return subprocess.run([sys.executable, "-c", "from flows.cli import console; console()", *args],
                              cwd=ROOT, env=env, capture_output=True, text=True)

    def content(
        self, store: str, outputs: tuple[str, str], extra_env: dict[str, str] | None = None
    ) -> dict[str, str]:
        """sha256 of the final checkpoint's weights and of every file of the HF export."""
        with _environ(extra_env):
            st = _store(store)
            ckpt, export = (Path(st.fetch(d)) for d in outputs)
        hashes = {"checkpoint/lit_model.pth": sha256_file(ckpt / "lit_model.pth")}
        for f in sorted(export.rglob("*")):
            if f.is_file():
                hashes[f"export/{f.relative_to(export)}"] = sha256_file(f)
        return hashes

    def verify(self, store: str, extra_env: dict[str, str] | None = None) -> list[str]:
        with _environ(extra_env):
            return _store(store).verify().problems

    def finish(self, row: Row, name: str, store: str, run: Run, extra_env: dict[str, str] | None = None,
               rerun_note: str = "re-run") -> Run:
        """Re-run once if the run failed (the user's recovery), then compare with the reference."""
        if run.rc != 0:
            row.notes.append(f"failed: {_last_error(run.out)[:300]}; {rerun_note}")
            row.orphans += len(run.orphans)
            run = self.run(name, store, extra_env=extra_env)
        row.orphans += len(run.orphans)
        if run.orphans:
            row.notes.append(f"orphans: {run.orphans[:2]}")
        outputs = run.outputs()
        row.survived = run.rc == 0 and outputs is not None
        if not row.survived:
            row.notes.append(f"recovery failed: {_last_error(run.out)[:300]}")
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
    def make_reference(self, reuse: Path | None = None) -> None:
        """The undisturbed run, or (`reuse`) the reference folder of an earlier bench run of this recipe."""
        if reuse is not None:
            store = _file_store(reuse / "store")
            st = _store(store)
            outputs = (st.resolve(f"runs/{RUN_NAME}/annealing"), st.resolve(f"runs/{RUN_NAME}/export"))
            timing, wall, note = reuse / "timing.jsonl", 0.0, f" (reused from {reuse})"
        else:
            store = _file_store(self.work / "reference" / "store")
            run = self.run("reference", store)
            found = run.outputs()
            if run.rc != 0 or found is None:
                raise SystemExit(f"the undisturbed run failed:\n{run.out[-3000:]}")
            outputs, timing, wall, note = found, self.work / "reference" / "timing.jsonl", run.wall, ""
        self.reference_store = store
        self.reference = self.content(store, outputs)
        for r in _timing(timing):
            if r["ok"]:
                self.durations[r["name"]] = r["duration_s"]
        st = _store(store)
        for name in self.durations:
            if name.startswith(STAGE_PREFIX):
                stage = name[len(STAGE_PREFIX):]
                self.steps[stage] = int(getattr(st.get_manifest(f"runs/{RUN_NAME}/{stage}"), "step", 0))
        weights = self.reference["checkpoint/lit_model.pth"][:16]
        print(f"reference: {wall:.0f} s, {len(self.durations)} steps, lit_model.pth {weights}, "
              f"{len(self.reference) - 1} export files{note}", flush=True)

    def moment(self, step: str, low: float = 0.1, high: float = 0.7) -> float:
        """A random moment inside `step`: seconds after it starts (a part of its reference time)."""
        return self.rng.uniform(low, high) * self.durations.get(step, 1.0)

    # ------------------------------------------------------------------ rows
    def row1(self) -> Row:
        row = Row(1, "SIGKILL of `vinasmol run` inside each step in turn")
        store = _file_store(self.work / "row1" / "store")
        order = [n for n in self.durations]  # executed steps of the reference, in the order they ended
        missed: list[str] = []
        for target in KILL_STEPS:
            where: list[str] = []
            extra: dict[str, str] = {}
            hold: StageHold | None = None
            if target.startswith(STAGE_PREFIX):
                stage = target[len(STAGE_PREFIX):]
                step = self.rng.randint(1, max(1, self.steps.get(stage, 2) - 1))
                hold = StageHold(self.work / "row1", stage, step)
                extra = hold.env
                delay = 0.0
            else:
                delay = self.moment(target, 0.0, 0.5)

            def kill(proc: subprocess.Popen[str], live: Live, target: str = target, delay: float = delay,
                     hold: StageHold | None = hold, where: list[str] = where) -> None:
                if hold is not None:  # the stage holds after its step: the kill lands there
                    if hold.wait(proc):
                        os.kill(proc.pid, signal.SIGKILL)
                        where.append(f"the stage held after step {hold.step} of {self.steps.get(hold.stage)} "
                                     f"(it wrote {hold.expected!r}); SIGKILL")
                    return
                started = f"Created task run '{target}'"
                while proc.poll() is None and started not in live.text():
                    time.sleep(0.02)
                if proc.poll() is not None:
                    return
                t0 = time.monotonic()
                while proc.poll() is None and time.monotonic() - t0 < delay and not live.finished(target):
                    time.sleep(0.005)
                if proc.poll() is None and not live.finished(target):
                    os.kill(proc.pid, signal.SIGKILL)
                    where.append(f"{time.monotonic() - t0:.2f} s after its task run started "
                                 f"({started!r} seen), before it ended; SIGKILL")

            run = self.run("row1", store, during=kill, extra_env=extra)
            if hold is not None:
                hold.close()
            row.orphans += len(run.orphans)
            if run.orphans:
                row.notes.append(f"orphans after a kill in {target}: {run.orphans[:2]}")
            done = {r["name"] for r in _timing(self.work / "row1" / "timing.jsonl") if r["ok"]}
            interrupted = next((s for s in order if s not in done), "none (the run had finished)")
            if where and interrupted == target:
                row.injected += 1
                landed(1, f"{target}: killed {where[0]} (rc {run.rc}, {run.wall:.0f} s)")
            else:
                missed.append(target)
                why = where[0] if where else "no kill sent: the step ended (or the run) before the moment"
                landed(1, f"{target}: MISSED: {why}; interrupted {interrupted} (rc {run.rc})")
        final = self.run("row1", store)
        self.finish(row, "row1", store, final)
        executed = [r["name"] for r in _timing(self.work / "row1" / "timing.jsonl") if r["ok"]]
        twice = sorted({n for n in executed if executed.count(n) > 1})
        if twice:
            row.notes.append(f"finished steps recomputed: {twice}")
            row.identical = False
        row.notes.append(f"kills inside their step: {row.injected} of {len(KILL_STEPS)}")
        if missed:
            row.notes.append(f"missed: {', '.join(missed)}")
            row.survived = False
        return row

    def row9(self) -> Row:
        row = Row(9, "SIGTERM to a training stage's process")
        store = _file_store(self.work / "row9" / "store")
        stage = "eeve-6"
        sent: list[str] = []

        def term(proc: subprocess.Popen[str], live: Live) -> None:
            # after the stage's first train-state its SIGTERM handler is in place (set before step 1)
            if not _wait_for_ref(proc, store, f"partial/{stage}/"):
                return
            pids = _stage_processes(proc.pid)
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
            if pids:
                sent.append(landed(9, f"SIGTERM to {stage}'s process {pids} after its first train-state "
                                      f"({sorted(_refs(store, f'partial/{stage}/'))[0].rsplit('/', 1)[-1]})"))

        run = self.run("row9", store, during=term)
        row.injected = len(sent)
        stopped = re.search(rf"stage {stage}: stopped by SIGTERM after step (\d+) of (\d+)", run.out)
        graceful = resumed_ok = False
        if stopped:
            step = int(stopped.group(1))
            states = _refs(store, f"partial/{stage}/")
            saved = any(k.endswith(f"step-{step:08d}") for k in states)
            graceful = run.rc != 0 and saved
            row.notes.append(landed(9, f"graceful stop after step {step} of {stopped.group(2)}; "
                                       f"train-state of step {step} in the store: {saved}"))
        else:
            row.notes.append(f"no graceful stop reported (rc {run.rc}): {_last_error(run.out)[:200]}")
        final = self.finish(row, "row9", store, run)
        if stopped and final.rc == 0:
            resumed = _store(store).get_manifest(f"runs/{RUN_NAME}/{stage}").extra.get("resumed_from_step")
            resumed_ok = resumed == int(stopped.group(1))
            row.notes.append(f"the re-run resumed {stage} from step {resumed}")
        row.survived = row.survived and graceful and resumed_ok
        return row

    def row6(self) -> Row:
        row = Row(6, "a blob flipped, another deleted")
        dst = self.work / "row6" / "store"
        shutil.copytree(Path(self.reference_store[len("file://"):]), dst)  # a finished run's store
        store = _file_store(dst)
        st = _store(store)
        shas = [st.get_manifest(f"runs/{RUN_NAME}/{s}").files["lit_model.pth"].sha256
                for s in ("eeve-6", "eeve-7")]
        flipped, deleted = (dst / "blobs" / _blob_path(sha) for sha in shas)
        data = bytearray(flipped.read_bytes())
        data[len(data) // 2] ^= 0xFF
        flipped.chmod(0o644)
        flipped.write_bytes(bytes(data))
        deleted.unlink()
        row.injected = 2
        landed(6, f"flipped a byte of eeve-6's lit_model.pth blob {shas[0][:12]}, "
                  f"deleted eeve-7's {shas[1][:12]}")
        verify = self.cli("store", "verify", "--store", store)
        out = verify.stdout + verify.stderr
        named = [sha[:12] for sha in shas if sha in out]
        row.notes.append(f"`vinasmol store verify`: exit {verify.returncode}, "
                         f"names {len(named)} of 2 damaged blobs")
        run = self.run("row6", store, args=("--force", "eeve-7"))  # eeve-7 reads eeve-6's checkpoint
        told = run.rc != 0 and "verify --repair" in run.out and shas[0] in run.out
        row.notes.append(f"--force eeve-7: rc {run.rc}, the error names the blob and the repair: {told}")
        repair = self.cli("store", "verify", "--repair", "--store", store)
        removed = (repair.stdout + repair.stderr).count("removed corrupt blob")
        row.notes.append(f"`store verify --repair` removed {removed} blob(s); then --force eeve-6")
        prefix = "partial/eeve-6/"
        before_states, before_final = _refs(store, prefix), _store(store).resolve(f"runs/{RUN_NAME}/eeve-6")
        final = self.finish(row, "row6", store, self.run("row6", store, args=("--force", "eeve-6")))
        after_states = _refs(store, prefix)
        new_states = sorted(k.rsplit("/", 1)[-1] for k, d in after_states.items()
                            if before_states.get(k) != d)
        retrained = "train-stage-eeve-6" in final.executed and bool(new_states)
        if final.rc == 0:
            new_final = _store(store).resolve(f"runs/{RUN_NAME}/eeve-6") != before_final
            retrained = retrained and new_final
            row.notes.append(f"--force eeve-6 retrained: new train-states {new_states}, new eeve-6 manifest: "
                             f"{new_final}")
        row.survived = row.survived and len(named) == 2 and verify.returncode != 0 and told and retrained
        return row

    def row2(self) -> Row:
        row = Row(2, "SIGKILL of a stage's training process inside a deployment run")
        import ui_shots

        base = self.work / "row2"
        base.mkdir(parents=True)
        env = {**os.environ, "VINASMOL_STACK_DIR": str(base / "stack"), "PYTHONPATH": str(ROOT),
               STAGE_RUNNER_ENV: "process"}
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
                                os.kill(pid, signal.SIGKILL)
                                killed.append(landed(2, f"eeve-6's training process {pid} SIGKILLed after "
                                                        "its first train-state"))
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

    def overlap(self, row: Row, runs: list[Run], pattern: re.Pattern[str], what: str) -> None:
        """Count the fault as injected only if it met the work: a request failed and was retried (a line
        of the run's output says so); else the row fails as a fault that never landed."""
        lines = [ln.strip() for r in runs for ln in r.out.splitlines() if pattern.search(ln)]
        if lines:
            example = lines[0][:220]
            row.notes.append(landed(row.number, f"{len(lines)} {what} retry line(s), e.g. {example!r}"))
        else:
            row.injected = 0
            row.notes.append(landed(row.number, f"no {what} request failed and was retried during the fault: "
                                                "it did not overlap the work"))

    def row3(self) -> Row:
        row = Row(3, "SeaweedFS killed during a stage's publishes, restarted 10 s later")
        with self.seaweed("row3") as (server, env):
            store = server.store_url("vinasmol", "row3")
            holder = {"server": server}

            def outage(proc: subprocess.Popen[str], live: Live) -> None:
                if not _wait_for_ref(proc, store, "partial/eeve-4/", env):
                    return
                holder["server"].process.kill()
                holder["server"].process.wait()
                row.injected = 1
                landed(3, "SeaweedFS SIGKILLed after eeve-4's first train-state; back in 10 s")
                time.sleep(10)  # the outage's length, not a moment
                holder["server"] = self.restart_seaweed(holder["server"])

            run = self.run("row3", store, extra_env=env, during=outage)
            rerun = self.finish(row, "row3", store, run, extra_env=env)
            if row.injected:
                self.overlap(row, [run] if run.rc == 0 else [run, rerun], S3_RETRY, "S3")
            holder["server"].stop()
        return row

    def row8(self) -> Row:
        row = Row(8, "the S3 server paused (SIGSTOP) 30 s during a stage")
        with self.seaweed("row8") as (server, env):
            store = server.store_url("vinasmol", "row8")

            def pause(proc: subprocess.Popen[str], live: Live) -> None:
                if not _wait_for_ref(proc, store, "partial/eeve-4/", env):
                    return
                os.killpg(server.process.pid, signal.SIGSTOP)
                row.injected = 1
                landed(8, "SeaweedFS paused (SIGSTOP) after eeve-4's first train-state; SIGCONT in 30 s")
                time.sleep(30)  # the pause's length, not a moment
                os.killpg(server.process.pid, signal.SIGCONT)

            run = self.run("row8", store, extra_env=env, during=pause)
            self.finish(row, "row8", store, run, extra_env=env)
            if row.injected:
                self.overlap(row, [run], S3_RETRY, "S3")
        return row

    def row4(self) -> Row:
        row = Row(4, "the Prefect server killed during a stage, restarted 10 s later")
        server = BenchPrefect(self.work / "row4" / "server", self.env("row4"))
        store = _file_store(self.work / "row4" / "store")
        extra = {"PREFECT_API_URL": server.url, "PREFECT_LOGGING_LOGGERS_PREFECT_CLIENT_LEVEL": "DEBUG"}

        def outage(proc: subprocess.Popen[str], live: Live) -> None:
            if not _wait_for_ref(proc, store, "partial/eeve-4/"):
                return
            server.stop()
            row.injected = 1
            landed(4, "the Prefect server SIGKILLed after eeve-4's first train-state; back in 10 s")
            time.sleep(10)  # the outage's length, not a moment
            server.start()

        try:
            run = self.run("row4", store, extra_env=extra, during=outage)
            rerun = self.finish(row, "row4", store, run, extra_env=extra)
            if row.injected:
                self.overlap(row, [run] if run.rc == 0 else [run, rerun], API_RETRY, "Prefect API")
        finally:
            server.stop()
        return row

    def row12(self) -> Row:
        row = Row(12, "the Prefect server's database deleted and recreated during a run")
        server = BenchPrefect(self.work / "row12" / "server", self.env("row12"))
        store = _file_store(self.work / "row12" / "store")
        extra = {"PREFECT_API_URL": server.url}

        def wipe(proc: subprocess.Popen[str], live: Live) -> None:
            if not _wait_for_ref(proc, store, "partial/eeve-4/"):
                return
            server.stop()
            gone = server.delete_database()
            row.injected = 1
            landed(12, f"Prefect server stopped after eeve-4's first train-state, {gone} deleted, a new one "
                       f"started on port {server.port}")
            server.start()

        try:
            run = self.run("row12", store, extra_env=extra, during=wipe)
            failed = f"the run failed: {_last_error(run.out)[:200]}"
            row.notes.append("the run rode it out" if run.rc == 0 else failed)
            self.finish(row, "row12", store, run, extra_env=extra)
        finally:
            server.stop()
        return row

    def row10(self) -> Row:
        row = Row(10, "a rank that hangs inside a step")
        store = _file_store(self.work / "row10" / "store")
        stage, timeout = "eeve-6", 20
        step = self.rng.randint(2, max(2, self.steps.get(stage, 2)))
        hold = StageHold(self.work / "row10", f"{stage}/rank0", step, env=HOLD_IN_STEP_ENV)
        args = ("--set", f"stages[{stage}].step_timeout={timeout}")  # the same for the re-run
        held: list[float] = []

        def watch(proc: subprocess.Popen[str], live: Live) -> None:
            if hold.wait(proc):
                held.append(time.monotonic())
                landed(10, f"{stage}'s rank 0 held inside step {step} of {self.steps.get(stage)} "
                           f"(it wrote {hold.expected!r}); step_timeout={timeout} s")

        run = self.run("row10", store, args=args, during=watch, extra_env=hold.env)
        hold.close()
        row.injected = len(held)
        pattern = rf"stage {re.escape(stage)}: rank 0: no optimizer step completed in \d+ s .*?step (\d+) of"
        ended = re.search(pattern, run.out)
        states = sorted(_refs(store, f"partial/{stage}/"))
        newest = int(states[-1].rsplit("-", 1)[-1]) if states else 0
        if ended:
            row.notes.append(landed(10, f"the watchdog ended the stage (rc {run.rc}) naming step "
                                        f"{ended.group(1)}; newest train-state: step {newest}"))
        else:
            row.notes.append(f"no watchdog message (rc {run.rc}): {_last_error(run.out)[:200]}")
        final = self.finish(row, "row10", store, self.run("row10", store, args=args))
        resumed = None
        if final.rc == 0:
            resumed = _store(store).get_manifest(f"runs/{RUN_NAME}/{stage}").extra.get("resumed_from_step")
            row.notes.append(f"the re-run resumed {stage} from step {resumed}")
        row.orphans += len(run.orphans)
        named = ended is not None and int(ended.group(1)) == step
        row.survived = row.survived and run.rc != 0 and named and resumed == newest
        return row

    def row11(self) -> Row:
        row = Row(11, "the store's disk full during a publish")
        disk = self.work / "row11" / "store"
        disk.mkdir(parents=True)
        size_mb = 2 * _du(Path(self.reference_store[len("file://"):])) // (1 << 20) + 64
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(disk)],
                               capture_output=True, text=True)
        if mount.returncode != 0:
            row.notes.append(landed(11, f"not run: a tmpfs needs root ({mount.stderr.strip()})"))
            return row
        try:
            store = _file_store(disk)
            filler = disk / "filler"

            def fill(proc: subprocess.Popen[str], live: Live) -> None:
                if not _wait_for_ref(proc, store, "partial/eeve-4/"):
                    return
                with open(filler, "wb") as fh:  # leave 64 KB: the next train-state does not fit
                    fh.write(b"\0" * max(0, shutil.disk_usage(disk).free - 65_536))
                row.injected = 1
                landed(11, f"the store's disk ({size_mb} MB tmpfs) filled after eeve-4's first train-state")

            run = self.run("row11", store, during=fill)
            error = _last_error(run.out)
            clean = run.rc != 0 and "No space left on device" in run.out and str(disk) in run.out
            row.notes.append(f"rc {run.rc}: {error[:240]}; a StoreError naming the disk: {clean}")
            problems = self.verify(store)
            row.notes.append(f"verify after the failure: {len(problems)} problem(s)")
            row.notes.extend(f"verify: {p}" for p in problems[:2])
            filler.unlink(missing_ok=True)
            self.finish(row, "row11", store, self.run("row11", store))
            row.survived = row.survived and clean and not problems
        finally:
            subprocess.run(["umount", str(disk)], check=False)
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
            row.notes.append(landed(5, f"not run: a tmpfs needs root ({mount.stderr.strip()})"))
            return row
        try:
            env = {"TMPDIR": str(scratch), "VINASMOL_WORK_DIR": str(scratch / "work")}
            store = _file_store(self.work / "row5" / "store")
            filler = scratch / "filler"

            def fill(proc: subprocess.Popen[str], live: Live) -> None:
                while proc.poll() is None and not live.finished("evaluate-eeve-4"):
                    time.sleep(0.05)
                if proc.poll() is not None:
                    return
                with open(filler, "wb") as fh:  # leave ~200 KB: the next checkpoint does not fit
                    free = shutil.disk_usage(scratch).free
                    fh.write(b"\0" * max(0, free - 200_000))
                row.injected = 1
                landed(5, "the scratch tmpfs filled once evaluate-eeve-4 ended (eeve-6 starting)")

            run = self.run("row5", store, extra_env=env, during=fill)
            row.notes.append(f"rc {run.rc}: {_last_error(run.out)[:240]}")
            problems = self.verify(store)
            row.notes.append(f"store after the failure: {len(problems)} problem(s)")
            filler.unlink(missing_ok=True)
            self.finish(row, "row5", store, self.run("row5", store, extra_env=env))
        finally:
            subprocess.run(["umount", str(scratch)], check=False)
        return row

    # ------------------------------------------------------------------ an S3 server
    def seaweed(self, name: str) -> Any:
        from vinasmol_core.localserver.seaweed import start_seaweed

        @contextmanager
        def server() -> Iterator[Any]:
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


class BenchPrefect:
    """A Prefect server of the bench's own (SQLite in `home`) on a fixed loopback port: the run talks to
    it, the bench kills it, deletes its database, starts it again on the same port."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        from vinasmol_core.localserver.localhost import free_ports

        self.home, self.port = home, free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = {**env, "PREFECT_HOME": str(home)}
        self.env.pop(TAG_ENV, None)  # the bench's server, not the run's
        self.env.pop("PREFECT_API_URL", None)
        self.procs: list[subprocess.Popen[bytes]] = []
        home.mkdir(parents=True, exist_ok=True)
        self.start()

    def start(self) -> None:
        from flows.local_server import seed_from_template
        from vinasmol_core.localserver.localhost import http_ok

        env = dict(self.env)
        seed_from_template(self.home / "prefect.db", env)  # a new database: no migrations to wait for
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(self.port), "--no-services", "--no-ui"]
        with open(self.home / "server.log", "ab") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 180
        while not http_ok(f"{self.url}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the Prefect server did not start; see {self.home / 'server.log'}")
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def delete_database(self) -> str:
        gone = [p.name for p in self.home.glob("prefect.db*") if p.is_file()]
        for name in gone:
            (self.home / name).unlink()
        return ", ".join(gone) or "no database file"


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


def _store(url: str) -> Any:
    from vinasmol_core.store import ArtifactStore

    return ArtifactStore(url)


@contextmanager
def _environ(extra: dict[str, str] | None) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(extra or {})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _refs(store: str, prefix: str, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    with _environ(extra_env):
        return _store(store).list_refs(prefix)


def _wait_for_ref(proc: subprocess.Popen[str], store: str, prefix: str,
                  extra_env: dict[str, str] | None = None) -> bool:
    """Wait until a ref under `prefix` exists (e.g. a stage's first train-state); False if `proc` ends
    first."""
    st = None
    while proc.poll() is None:
        try:
            if st is None:
                with _environ(extra_env):
                    st = _store(store)
            if st.list_refs(prefix):
                return proc.poll() is None
        except Exception:  # noqa: BLE001 - a store being created or written: look again
            pass
        time.sleep(0.05)
    return False


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None, help="unused: the tiny recipe has built-in corpora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default="1,2,3,4,5,6,7,8,9,10,11,12")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="reuse the reference folder (store, timing.jsonl) of an earlier bench run")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (default: delete it)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny-cpu.yaml")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="vinasmol-faults-"))
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"--work {work}: not empty")
    os.environ[STAGE_RUNNER_ENV] = "process"  # also for the stack of row 2 and its workers
    print(f"seed {args.seed}, work folder {work}", flush=True)
    bench = Bench(work, args.recipe.resolve(), args.seed)
    try:
        bench.make_reference(args.reference.resolve() if args.reference else None)
        rows = []
        for n in (int(x) for x in args.rows.split(",")):
            t0 = time.perf_counter()
            row = getattr(bench, f"row{n}")()
            if row.available and not row.injected:
                row.survived = row.identical = False  # a fault that never landed proves nothing
                row.notes.append("nothing injected: FAILED")
            rows.append(row)
            print(f"row {n}: {time.perf_counter() - t0:.0f} s: injected={row.injected} "
                  f"survived={row.survived} identical={row.identical} lost={row.lost} orphans={row.orphans}"
                  + ("" if row.available else " (not available)"), flush=True)
    finally:
        if not args.keep:
            for mount in sorted(work.glob("row*/*")):
                if os.path.ismount(mount):
                    subprocess.run(["umount", str(mount)], check=False)
            shutil.rmtree(work, ignore_errors=True)
    print("\n| # | fault | injected | survived | same digests | lost | orphans | notes |")
    print("| --- | --- | ---: | --- | --- | ---: | ---: | --- |")
    for r in rows:
        if not r.available:
            print(f"| {r.number} | {r.fault} | - | - | - | - | - | {'; '.join(r.notes)} |")
            continue
        print(f"| {r.number} | {r.fault} | {r.injected} | {'yes' if r.survived else 'NO'} | "
              f"{'yes' if r.identical else 'NO'} | {r.lost} | {r.orphans} | {'; '.join(r.notes)} |")
    counted = [r for r in rows if r.available]
    injected = sum(r.injected for r in counted)
    survived = sum(r.injected for r in counted if r.survived)
    identical = sum(r.injected for r in counted if r.identical)
    lost, orphans = sum(r.lost for r in counted), sum(r.orphans for r in counted)
    print(f"faults: injected={injected} survived={survived} identical={identical} "
          f"lost={lost} orphans={orphans} seed={args.seed}")
    passed = all(r.ok for r in rows) and survived == identical == injected
    return 0 if passed and not lost and not orphans else 1


if __name__ == "__main__":
    raise SystemExit(main())
