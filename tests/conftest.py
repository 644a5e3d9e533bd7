"""Shared fixtures: a Prefect test server and a SeaweedFS S3 server (each one per session, started on
first use), and a `store` parametrized over file:// and s3:// (a fresh bucket per test)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# `make test` runs two workers on as many cores. A torch process with two threads, sharing its cores
# with another busy one, spends more time waiting at every parallel region than computing (the tiny
# model's evaluation: about 7 s with two threads against 0.6 s with one, measured here). One thread per
# process, this one and every process it starts, unless the environment already says otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# A one-device stage trains in the test's own process (`train.process.STAGE_RUNNER_ENV`): the same
# `run_stage`, the same metrics lines, without a new process's 15-20 s of imports. Tests of what needs
# a process of its own (signals, kills, groups, the deployment path) ask for `stage_processes`.
os.environ.setdefault("VINASMOL_STAGE_RUNNER", "in-process")


@pytest.fixture
def stage_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage this test starts is a process of its own, as in production."""
    monkeypatch.setenv("VINASMOL_STAGE_RUNNER", "process")


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API (SQLite, subprocess server) shared by every test that asks for it."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A local SeaweedFS S3 server (`localserver.seaweed.SeaweedServer`) for the whole session.

    Use `seaweed.endpoint_url`, `.access_key`, `.secret_key`, `.create_bucket(name)`, `.env()`."""
    from vinasmol_core.common.errors import StoreError
    from vinasmol_core.localserver.seaweed import find_weed, start_seaweed

    try:
        find_weed()
    except StoreError as exc:  # the test extra installs it: a missing server is a failure, never a skip
        pytest.fail(str(exc))
    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(seaweed) -> str:  # noqa: ANN001
    """A fresh, empty bucket on the session's SeaweedFS server."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    seaweed.create_bucket(name)
    return name


@dataclass
class StoreSpec:
    """How to open one test store, here or in a subprocess (`env` carries URL and credentials)."""

    kind: str
    url: str
    cache_dir: Path
    options: dict[str, str] = field(default_factory=dict, repr=False)
    env: dict[str, str] = field(default_factory=dict, repr=False)

    def open(self, cache_dir: Path | None = None, **kw: object):  # noqa: ANN201 - ArtifactStore
        from vinasmol_core.store import ArtifactStore

        return ArtifactStore(self.url, cache_dir=cache_dir or self.cache_dir, **self.options, **kw)


@pytest.fixture(params=["file", "s3"])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSpec:
    """A fresh store on local disk or on SeaweedFS (fresh bucket)."""
    if request.param == "file":
        url = (tmp_path / "store").as_uri()
        return StoreSpec("file", url, tmp_path / "cache", env={"VINASMOL_STORE": url})
    server = request.getfixturevalue("seaweed")
    bucket = request.getfixturevalue("s3_bucket")
    url = f"s3://{bucket}/store"
    return StoreSpec(
        "s3",
        url,
        tmp_path / "cache",
        options={"endpoint_url": server.endpoint_url, "key": server.access_key, "secret": server.secret_key},
        env={**server.env(), "VINASMOL_STORE": url},
    )


@pytest.fixture
def store(store_spec: StoreSpec):  # noqa: ANN201 - ArtifactStore
    """An empty ArtifactStore, once on file:// and once on s3:// (SeaweedFS)."""
    return store_spec.open()


# Scheduling (`make test`: `-n 2 --dist loadfile`): a module runs whole on one worker (its module-scoped
# fixtures are built once), and the slowest modules start first, so the two workers end together
# instead of one finishing a long module alone (`make slowest` lists the last run's slowest tests).
# Not `--dist loadgroup`: pytest-xdist 3.8 marks a group in `item._nodeid`, which pytest 9 no longer
# reads, so its groups are silently split across workers.
SLOWEST_FIRST = (
    "test_infra_stack.py",
    "test_faults.py",
    "test_train_group.py",
    "test_train_dist.py",
    "test_flows_pipeline.py",
    "test_flows_sweep.py",
    "test_train_engine.py",
    "test_train_compile.py",
    "test_train_background.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order
