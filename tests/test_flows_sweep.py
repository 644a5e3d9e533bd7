"""`vinasmol sweep` end to end on the tiny recipe, against a real Prefect server: a grid over stage
eeve-3's mixture where one end is worse by construction (no Vietnamese, so the new Vietnamese
embedding rows learn nothing), one proxy run that fails, and a sweep SIGKILLed part way then started
again, which reuses every finished proxy run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import run_vinasmol
from tests.test_faults import TAG, _left_after
from vinasmol_core.plan.recipe import load_recipe
from vinasmol_core.train.hold import StageHold

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny-cpu.yaml"
VI_SHARES = [0.0, 0.3, 0.6, 0.8, 0.95]  # of the 0.95 that vi and en share (code keeps 0.05)
SWEEP = {
    "name": "grid",
    "stage": "eeve-3",
    "search": {"mixture": {"vary": ["vi", "en"], "concentration": 4.0}},
    "runs": 0,
    "configs": [{"mixture": {"vi": s, "en": round(0.95 - s, 2)}} for s in VI_SHARES],
    "tokens_per_run": 4096,
    "check_seeds": [1],
    "objective": {"vi": {"weight": 1.0}},
}
FAILING = "eeve-3-p03"


def _rows(out: str) -> dict[str, list[str]]:
    """The runs table of the sweep's report: run name -> its cells."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("| eeve-3-"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_sweep_finds_the_better_mixture_and_resumes(prefect_server, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    from vinasmol_core.store import ArtifactStore

    sweep_file = tmp_path / "grid.sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    store, out_file = "file://" + str(tmp_path / "store"), tmp_path / "swept.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PREFECT_API_URL=str(PREFECT_API_URL.value()), VINASMOL_WORK_DIR=str(tmp_path / "work"),
               VINASMOL_CACHE=str(tmp_path / "cache"), PREFECT_LOGGING_LEVEL="WARNING", TQDM_DISABLE="1",
               VINASMOL_FAIL_AT=f"{FAILING}:2")  # that proxy run fails at step 2, every time
    cmd = [sys.executable, "-c", "from flows.cli import console; console()", "sweep", str(RECIPE),
           str(sweep_file), "--store", store, "--stage-runner", "inline", "--out", str(out_file)]

    # 1. Killed inside the first check run (every proxy run and the fit are behind it), held after its
    # train-state of step 8, half way.
    tag, hold = uuid.uuid4().hex, StageHold(tmp_path, "eeve-3-best-s1", 8)
    with open(tmp_path / "killed-sweep.txt", "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, **hold.env, TAG: tag}, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert hold.wait(proc), "the run ended before its stage held"
    st = ArtifactStore(store)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _left_after(tag) == [], "the killed sweep left processes behind"
    assert not out_file.exists()

    # 2. The same command again: the finished runs are reused, the failing one fails again and is
    # reported, the fit uses the other four, the check run resumes.
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _rows(done.stdout)
    assert set(rows) == {f"eeve-3-p{i:02d}" for i in range(5)} | {"eeve-3-best-s1", "eeve-3-recipe-s1"}
    status = {name: cells[-1] for name, cells in rows.items()}
    assert all(status[f"eeve-3-p{i:02d}"] == "cached" for i in (0, 1, 2, 4)), status
    assert status[FAILING].startswith("failed"), status
    assert status["eeve-3-best-s1"] == status["eeve-3-recipe-s1"] == "trained"
    assert "Fit: 4 finished proxy runs" in done.stdout
    (best_ref,) = st.list_refs("stages/eeve-3-best-s1/")
    assert st.get_manifest(best_ref).extra["resumed_from_step"] == 8  # from the train-state half way

    objective = {name: float(cells[-2]) for name, cells in rows.items() if cells[-2] != "-"}
    proxies = {n: v for n, v in objective.items() if "-p" in n}
    assert max(proxies, key=proxies.get) == "eeve-3-p00"  # no Vietnamese: the worst, by construction
    assert min(proxies, key=proxies.get) != "eeve-3-p00"
    assert objective["eeve-3-best-s1"] < objective["eeve-3-recipe-s1"]  # the choice beats the recipe's

    chosen = next(s for s in load_recipe(out_file).stages if s.name == "eeve-3")
    assert chosen.mixture["vi"] / 0.95 > 0.6 and chosen.mixture["code"] == 0.05, chosen.mixture
    assert f"eeve-3.mixture={{vi: {chosen.mixture['vi']:g}" in done.stdout


def test_bad_sweep_file_stops_before_any_run(monkeypatch, capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SWEEP, "stage": "eeve-9"}))
    out = tmp_path / "swept.yaml"
    code, _, err = run_vinasmol(monkeypatch, capsys, "sweep", str(RECIPE), str(bad), "--store",
                                "file://" + str(tmp_path / "store"), "--out", str(out))
    assert code == 1 and "'eeve-9' is no stage" in err and not out.exists()
