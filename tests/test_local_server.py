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
