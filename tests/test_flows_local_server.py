"""The demo's own Prefect server: a new Prefect home starts from the prepared database template
(migrated, block types registered), the server skips both steps and still serves the block types."""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from pathlib import Path

from flows.local_server import LocalPrefectServer, build_database_template, database_template


def _block_type_slugs(api_url: str) -> set[str]:
    req = urllib.request.Request(f"{api_url}/block_types/filter", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return {b["slug"] for b in json.loads(resp.read())}


def test_new_home_starts_from_the_template_and_keeps_its_data(tmp_path: Path) -> None:
    template, _ = build_database_template()  # `make` built it at install; built here otherwise
    assert template == database_template()
    with sqlite3.connect(template) as db:
        assert db.execute("select count(*) from block_type").fetchone()[0] > 0
        assert db.execute("select count(*) from flow_run").fetchone()[0] == 0

    home = tmp_path / "prefect"
    server = LocalPrefectServer(home)
    try:
        server.wait_ready()
        assert (home / "database-template-version").read_text() == template.stem.removeprefix("prefect-")
        assert {"local-file-system", "remote-file-system"} <= _block_type_slugs(server.api_url)
    finally:
        server.stop()
    assert server.process.returncode is not None

    # A second start keeps the existing database: nothing is copied over it.
    with sqlite3.connect(home / "prefect.db") as db:
        db.execute("create table kept_by_the_second_start (x int)")
    server = LocalPrefectServer(home)
    try:
        server.wait_ready()
    finally:
        server.stop()
    with sqlite3.connect(home / "prefect.db") as db:
        kept = "select count(*) from sqlite_master where name = 'kept_by_the_second_start'"
        assert db.execute(kept).fetchone()[0] == 1


def test_server_dies_with_the_command_that_started_it(tmp_path: Path) -> None:
    """A demo killed outright (SIGKILL, the OOM killer) leaves no Prefect server behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = "\n".join([
        "import sys, time",
        "from pathlib import Path",
        "from flows.local_server import LocalPrefectServer",
        "server = LocalPrefectServer(Path(sys.argv[1]))",
        "print(server.process.pid, flush=True)",
        "time.sleep(600)",
    ])
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "prefect")],
                              stdout=subprocess.PIPE, text=True)
    server_pid = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            return
        # Reaped by init once it exits; until then it may linger as a zombie, which counts as gone.
        with open(f"/proc/{server_pid}/stat") as stat:
            if stat.read().split(") ", 1)[1].startswith("Z"):
                return
        time.sleep(0.2)
    os.kill(server_pid, signal.SIGKILL)
    raise AssertionError("the Prefect server outlived the process that started it")


def test_a_deleted_database_without_template_registers_blocks_again(tmp_path: Path, monkeypatch) -> None:
    """The marker of a seeded database is dropped with the database it described."""
    import flows.local_server as local_server

    database = tmp_path / "prefect" / "prefect.db"
    monkeypatch.setattr(local_server, "database_template", lambda: tmp_path / "no-template.db")
    database.parent.mkdir(parents=True)
    (database.parent / "database-template-version").write_text(local_server.version("prefect"))
    env: dict[str, str] = {}
    local_server.seed_from_template(database, env)
    assert "PREFECT_API_BLOCKS_REGISTER_ON_START" not in env
    assert not (database.parent / "database-template-version").exists()
