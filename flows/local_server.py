"""The Prefect API server that `vinasmol demo` runs for itself, and the database it starts from.

Imports nothing of Prefect: the server is started before Prefect, torch and the pipeline are
imported in the demo's own process, so that its boot overlaps them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.localserver.localhost import die_with_parent, free_ports, http_ok, stop_process

# Run in a subprocess against an empty SQLite file: what the server does on its first start.
_PREPARE_DATABASE = """
import asyncio
from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration

async def prepare():
    db = provide_database_interface()
    await db.create_db()
    async with await db.session() as session:
        await run_block_auto_registration(session=session)
        await session.commit()

asyncio.run(prepare())
"""
# In a demo's Prefect home: the Prefect version whose template its database was copied from.
_FROM_TEMPLATE = "database-template-version"


def database_template() -> Path:
    """Where the prepared, empty Prefect database of the installed Prefect version is kept."""
    return Path(sys.prefix) / "share" / "vinasmol" / f"prefect-{version('prefect')}.db"


def build_database_template() -> tuple[Path, bool]:
    """Migrate an empty database and register Prefect's block types in it, once per Prefect version
    (about 19 s on two cores, 12 of them migrations). Returns the path and whether it was built now."""
    target = database_template()
    if target.exists():
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        db = Path(tmp) / "prefect.db"
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(PREFECT_HOME=tmp, PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{db}")
        proc = subprocess.run([sys.executable, "-c", _PREPARE_DATABASE], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not db.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
            raise VinaSmolError(f"preparing an empty Prefect database in {target.parent} failed:\n{tail}")
        os.replace(db, target)
    return target, True


def seed_from_template(database: Path, env: dict[str, str]) -> None:
    """Start a new SQLite `database` as a copy of the prepared template, when there is one. A server
    on a database seeded from this Prefect version's template skips block registration (set in
    `env`), since the template has it; any other database is left to the server."""
    marker, template = database.with_name(_FROM_TEMPLATE), database_template()
    if not database.exists():
        marker.unlink(missing_ok=True)  # whatever it said was about a database that is gone
        if template.exists():
            database.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(template, database.with_suffix(".db.part"))
            os.replace(database.with_suffix(".db.part"), database)
            marker.write_text(version("prefect"))
    if marker.exists() and marker.read_text() == version("prefect"):
        env["PREFECT_API_BLOCKS_REGISTER_ON_START"] = "false"


class LocalPrefectServer:
    """`prefect server start` for one command, on a free loopback port, its SQLite database in
    `home` (PREFECT_HOME), seeded from the template (`seed_from_template`): the server then neither
    migrates it (about 12 s of CPU) nor registers block types (about 2 s)."""

    def __init__(self, home: Path, startup_timeout: float = 180.0) -> None:
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env["PREFECT_HOME"] = str(home)
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # its telemetry fails offline
        if "PREFECT_API_DATABASE_CONNECTION_URL" not in env:
            seed_from_template(home / "prefect.db", env)
        port = free_ports(1)[0]
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.log = home / "server.log"
        self.startup_timeout = startup_timeout
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(port), "--no-services", "--no-ui"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL,
                                            preexec_fn=die_with_parent if sys.platform == "linux" else None)
        self.started = time.monotonic()

    def wait_ready(self) -> None:
        while not http_ok(f"{self.api_url}/health"):
            if self.process.poll() is not None:
                raise VinaSmolError(f"the local Prefect server exited while starting; see {self.log}")
            if time.monotonic() - self.started > self.startup_timeout:
                self.stop()
                raise VinaSmolError("the local Prefect server did not answer within "
                                    f"{self.startup_timeout:.0f} s; see {self.log}")
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.process, timeout=15)
