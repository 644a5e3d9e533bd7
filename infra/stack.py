"""The local stack: a Prefect server, SeaweedFS as the S3 store, one process worker per work pool.

    python -m infra.stack up      # start everything on 127.0.0.1, register deployments + automation
    python -m infra.stack down    # stop what `up` started
    python -m infra.stack status  # what runs, where

State lives in `.stack/` (gitignored): the server's SQLite database (unless
$VINASMOL_PREFECT_DATABASE_URL names a PostgreSQL database), SeaweedFS data, the generated S3
credentials and Prefect API auth string (mode 0600), logs, and `stack.json` with ports and process ids.
`up` writes `.stack/env` (PREFECT_API_URL, PREFECT_UI_URL and PREFECT_API_AUTH_STRING, mode 0600) for
`source .stack/env`.

The Prefect API takes only requests that carry the stack's auth string (HTTP basic auth; the UI asks
for it once): the workers hold the store's keys and run whatever is deployed, so no other local user
may deploy or start runs. Credentials reach the flow runs through the workers' environment (AWS_*
variables and the auth string, inherited by the processes they start), never through parameters, so
they do not appear in the UI.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.local_server import seed_from_template
from vinasmol_core.localserver.localhost import free_ports, http_ok, pid_alive, port_open, stop_process_group

REPO = Path(__file__).resolve().parent.parent
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
DEFAULT_POOLS = {"cpu": "process", "cuda": "process"}
DEFAULT_ANNEALING_CRON = "0 3 * * 1"  # Mondays 03:00 UTC
BUCKET = "vinasmol"


class StackError(RuntimeError):
    """A stack component did not start or answer."""


def _bin(name: str) -> str:
    """An executable of this virtual environment (falls back to PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


@dataclass
class Stack:
    """One local stack rooted at `root` (default `<repo>/.stack`)."""

    root: Path = field(default_factory=lambda: Path(os.environ.get("VINASMOL_STACK_DIR", REPO / ".stack")))
    host: str = "127.0.0.1"
    prefect_port: int | None = None
    database_url: str | None = None
    pools: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_POOLS))
    worker_poll_seconds: float = 5.0
    heartbeat_seconds: int = 30
    annealing_cron: str | None = None
    services: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    prefect_file: Path = PREFECT_FILE

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.database_url = self.database_url or os.environ.get("VINASMOL_PREFECT_DATABASE_URL") or None
        self.annealing_cron = (
            self.annealing_cron or os.environ.get("VINASMOL_ANNEALING_CRON") or DEFAULT_ANNEALING_CRON
        )

    # ------------------------------------------------------------------ state
    @property
    def state_file(self) -> Path:
        return self.root / "stack.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def _save(self, state: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    @property
    def api_url(self) -> str:
        return self.state()["api_url"]

    @property
    def ui_url(self) -> str:
        return self.state()["ui_url"]

    def credentials(self) -> dict[str, str]:
        """The generated S3 credentials (created once, kept in `.stack/s3-credentials.json`, mode 0600)."""
        path = self.root / "s3-credentials.json"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            creds = {
                "access_key": "VS" + secrets.token_hex(9).upper(),
                "secret_key": secrets.token_urlsafe(30),
            }
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(creds, fh)
        return json.loads(path.read_text())

    def api_auth_string(self) -> str:
        """The Prefect API's auth string, `user:password` (created once, `.stack/prefect-auth`, mode 0600)."""
        path = self.root / "prefect-auth"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"vinasmol:{secrets.token_urlsafe(32)}")
        return path.read_text().strip()

    def api_settings(self) -> dict[Any, Any]:
        """Prefect settings that reach this stack's API, for `prefect.settings.temporary_settings`."""
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

        return {PREFECT_API_URL: self.api_url, PREFECT_API_AUTH_STRING: self.api_auth_string()}

    def store_url(self) -> str:
        return f"s3://{BUCKET}/store"

    def client_env(self) -> dict[str, str]:
        """What a CLI user needs: the API and UI addresses and the API's auth string."""
        st = self.state()
        return {
            "PREFECT_API_URL": st["api_url"],
            "PREFECT_UI_URL": st["ui_url"],
            "PREFECT_API_AUTH_STRING": self.api_auth_string(),
        }

    def store_env(self) -> dict[str, str]:
        """Environment that lets ArtifactStore() reach the stack's S3 store (holds credentials)."""
        st = self.state()
        creds = self.credentials()
        return {
            "VINASMOL_STORE": self.store_url(),
            "AWS_ENDPOINT_URL": st["s3_endpoint"],
            "AWS_ACCESS_KEY_ID": creds["access_key"],
            "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.client_env())
        env.update(self.store_env())
        env.update(
            {
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "PREFECT_WORKER_QUERY_SECONDS": str(self.worker_poll_seconds),
                "PREFECT_WORKER_PREFETCH_SECONDS": "10",
                "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(self.heartbeat_seconds),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_LOGGING_LEVEL": env.get("PREFECT_LOGGING_LEVEL", "INFO"),
                "TORCHDYNAMO_DISABLE": env.get("TORCHDYNAMO_DISABLE", "1"),
            }
        )
        env.update(self.extra_env)
        return env

    # ------------------------------------------------------------------ processes
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=str(cwd or REPO),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        st = self.state()
        st.setdefault("pids", {})[name] = proc.pid
        self._save(st)
        return proc.pid

    # ------------------------------------------------------------------ components
    def _start_seaweed(self) -> None:
        """SeaweedFS (`localserver.seaweed`) with the stack's credentials, detached from this process."""
        from vinasmol_core.localserver.seaweed import start_seaweed

        creds = self.credentials()
        server = start_seaweed(
            self.root / "seaweedfs",
            host=self.host,
            s3_port=self.state().get("s3_port"),
            access_key=creds["access_key"],
            secret_key=creds["secret_key"],
            buckets=(BUCKET,),
            die_with_parent=False,
        )
        st = self.state()
        st.update({"s3_port": server.ports["s3.port"], "s3_endpoint": server.endpoint_url})
        st.setdefault("pids", {})["seaweedfs"] = server.process.pid
        self._save(st)

    def _server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
        db = self.database_url or f"sqlite+aiosqlite:///{self.root / 'prefect' / 'prefect.db'}"
        env.update(
            {
                "PREFECT_HOME": str(self.root / "prefect"),
                "PREFECT_API_DATABASE_CONNECTION_URL": db,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_API_HOST": self.host,
                "PREFECT_UI_API_URL": self.state()["api_url"],
                "PREFECT_API_URL": self.state()["api_url"],
                # Every API request but the health check must carry it (the server's own clients do).
                "PREFECT_SERVER_API_AUTH_STRING": self.api_auth_string(),
                "PREFECT_API_AUTH_STRING": self.api_auth_string(),
                "PREFECT_LOGGING_SERVER_LEVEL": "WARNING",
            }
        )
        return env

    def _start_server(self) -> None:
        port = self.prefect_port or self.state().get("prefect_port") or free_ports(1, self.host)[0]
        if port_open(self.host, port):
            raise StackError(f"port {self.host}:{port} is taken: stop what listens there or pick another")
        st = self.state()
        st.update(
            {
                "prefect_port": port,
                "api_url": f"http://{self.host}:{port}/api",
                "ui_url": f"http://{self.host}:{port}",
                "database": "postgresql" if self.database_url else "sqlite",
            }
        )
        self._save(st)
        (self.root / "prefect").mkdir(parents=True, exist_ok=True)
        cmd = [_bin("prefect"), "server", "start", "--host", self.host, "--port", str(port)]
        if not self.services:
            cmd.append("--no-services")
        env = self._server_env()
        if not self.database_url:
            seed_from_template(self.root / "prefect" / "prefect.db", env)
        self._spawn("prefect-server", cmd, env, cwd=self.root)

    def _healthy(self) -> bool:
        return http_ok(f"{self.api_url}/health")

    def _wait(self, ready: Any, what: str, timeout: float, proc: str) -> None:
        deadline = time.monotonic() + timeout
        pid = self.state()["pids"][proc]
        while not ready():
            if not pid_alive(pid):
                raise StackError(f"{what} exited while starting; see {self.logs / (proc + '.log')}")
            if time.monotonic() > deadline:
                raise StackError(f"{what} not ready after {timeout:.0f} s; see {self.logs / (proc + '.log')}")
            time.sleep(0.3)

    def create_pools(self) -> None:
        """Create (or keep) the work pools: process pools here; see infra/kubernetes for CUDA nodes."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectAlreadyExists
        from prefect.settings import temporary_settings
        from prefect.workers.process import ProcessWorker

        template = ProcessWorker.get_default_base_job_template()
        with temporary_settings(self.api_settings()), get_client(sync_client=True) as client:
            for name, kind in self.pools.items():
                if kind != "process":
                    raise StackError(f"the local stack runs process pools only; {name!r} is {kind!r}")
                try:
                    client.create_work_pool(
                        WorkPoolCreate(
                            name=name,
                            type="process",
                            base_job_template=template,
                            description=f"VinaSmol {name} pool (local process workers)",
                        )
                    )
                except ObjectAlreadyExists:
                    pass

    def start_workers(self) -> None:
        env = self.worker_env()
        for name in self.pools:
            cmd = [
                _bin("prefect"),
                "worker",
                "start",
                "--pool",
                name,
                "--type",
                "process",
                "--name",
                f"vinasmol-{name}-worker",
            ]
            self._spawn(f"worker-{name}", cmd, env)

    def wait_for_workers(self, timeout: float = 120) -> None:
        """Until every pool has an online worker."""
        from prefect.client.orchestration import get_client
        from prefect.settings import temporary_settings

        deadline = time.monotonic() + timeout
        with temporary_settings(self.api_settings()), get_client(sync_client=True) as client:
            for name in self.pools:
                pid = self.state()["pids"][f"worker-{name}"]
                while not any(
                    w.status == "ONLINE" or str(w.status).endswith("ONLINE")
                    for w in client.read_workers_for_work_pool(name)
                ):
                    if not pid_alive(pid):
                        log = self.logs / f"worker-{name}.log"
                        raise StackError(f"worker for pool {name!r} exited; see {log}")
                    if time.monotonic() > deadline:
                        raise StackError(f"no worker online for pool {name!r} after {timeout:.0f} s")
                    time.sleep(0.5)

    def deploy(self, prefect_file: Path | None = None) -> None:
        """`prefect deploy --all` from the repository root with the stack's pools and schedule."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(self.client_env())
        env.update(
            {
                "VINASMOL_REPO": str(REPO),
                "VINASMOL_CPU_POOL": "cpu" if "cpu" in self.pools else next(iter(self.pools)),
                "VINASMOL_CUDA_POOL": "cuda" if "cuda" in self.pools else next(iter(self.pools)),
                "VINASMOL_ANNEALING_CRON": str(self.annealing_cron),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            }
        )
        path = Path(prefect_file or self.prefect_file)
        cmd = [_bin("prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(path)]
        res = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=600)
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.logs / "deploy.log").write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            raise StackError(f"prefect deploy failed (exit {res.returncode}); see {self.logs / 'deploy.log'}")

    def register_automation(self) -> None:
        from prefect.settings import temporary_settings

        from infra.automation import register_automations

        with temporary_settings(self.api_settings()):
            register_automations(self.api_url, within_seconds=3 * self.heartbeat_seconds)

    def write_env_file(self) -> Path:
        """`.stack/env` for `source`; it holds the API's auth string, so the owner alone reads it."""
        path = self.root / "env"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("".join(f"export {k}={v}\n" for k, v in self.client_env().items()))
        os.chmod(path, 0o600)
        return path

    def activate_profile(self, name: str = "vinasmol-local") -> str | None:
        """Point a Prefect profile `name` at this stack and make it the active one, so that plain
        `prefect ...` commands reach the stack; returns the profile that was active before."""
        from prefect.settings import (
            PREFECT_API_AUTH_STRING,
            PREFECT_API_URL,
            PREFECT_PROFILES_PATH,
            PREFECT_UI_URL,
        )
        from prefect.settings.profiles import load_profiles, save_profiles

        profiles = load_profiles()
        previous = profiles.active_name
        profiles.update_profile(
            name,
            settings={
                PREFECT_API_URL: self.api_url,
                PREFECT_UI_URL: self.ui_url,
                PREFECT_API_AUTH_STRING: self.api_auth_string(),
            },
        )
        profiles.set_active(name)
        save_profiles(profiles)
        os.chmod(PREFECT_PROFILES_PATH.value(), 0o600)  # it now holds the auth string
        st = self.state()
        if previous != name:
            st["previous_profile"] = previous
        st["profile"] = name
        self._save(st)
        return previous

    def restore_profile(self) -> None:
        """Make the profile that was active before `activate_profile` the active one again."""
        st = self.state()
        if not st.get("profile"):
            return
        from prefect.settings.profiles import load_profiles, save_profiles

        profiles = load_profiles()
        if profiles.active_name == st["profile"]:
            previous = st.get("previous_profile")
            profiles.set_active(previous if previous in profiles.names else "ephemeral", check=False)
            save_profiles(profiles)
        st.pop("profile", None)
        self._save(st)

    # ------------------------------------------------------------------ public
    def up(self, *, deploy: bool = True, workers: bool = True) -> None:
        """Start everything; a component already running (per stack.json) is left as it is."""
        self.root.mkdir(parents=True, exist_ok=True)
        running = self.running()
        timings: dict[str, float] = {}
        t0 = time.monotonic()

        def mark(what: str) -> None:
            timings[what] = round(time.monotonic() - t0, 1)

        try:
            if not running.get("prefect-server"):
                self._start_server()
            if not running.get("seaweedfs"):
                self._start_seaweed()
            mark("store")
            self._wait(self._healthy, "Prefect server", 300, "prefect-server")
            mark("server")
            self.create_pools()
            if workers and not all(running.get(f"worker-{p}") for p in self.pools):
                self.start_workers()
            if deploy:
                self.deploy()
                mark("deploy")
            self.register_automation()
            if workers:
                self.wait_for_workers()
                mark("workers")
            self.write_env_file()
        except BaseException:
            self.down()
            raise
        st = self.state()
        st["timings_s"] = timings
        self._save(st)

    def running(self) -> dict[str, bool]:
        return {name: pid_alive(pid) for name, pid in self.state().get("pids", {}).items()}

    def down(self) -> None:
        """Stop workers first (their runs end with them), then the server, then SeaweedFS."""
        st = self.state()
        pids: dict[str, int] = st.get("pids", {})
        order = sorted(pids, key=lambda n: (not n.startswith("worker-"), n == "seaweedfs"))
        for name in order:
            stop_process_group(pids[name])
        st["pids"] = {}
        if self.state_file.exists():
            self._save(st)

    def __enter__(self) -> Stack:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.stack", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("VINASMOL_PREFECT_PORT", "4200")),
        help="Prefect server port (default 4200)",
    )
    parser.add_argument("--no-deploy", action="store_true", help="skip `prefect deploy`")
    parser.add_argument(
        "--no-profile",
        action="store_true",
        help="leave the Prefect profiles alone (default: activate a `vinasmol-local` profile pointing here)",
    )
    args = parser.parse_args(argv)
    stack = Stack(prefect_port=args.port)
    if args.command == "up":
        stack.up(deploy=not args.no_deploy)
        if not args.no_profile:
            previous = stack.activate_profile()
            print(f"Prefect profile 'vinasmol-local' is active (was {previous!r}; `make down` restores it)")
        st = stack.state()
        print(f"Prefect UI     {st['ui_url']}  (database: {st['database']})")
        print(f"S3 store       {stack.store_url()} at {st['s3_endpoint']} (credentials in {stack.root})")
        print(f"work pools     {', '.join(stack.pools)} (one process worker each)")
        print(f"logs           {stack.logs}")
        print("next:          prefect deployment run vinasmol/full-cpt -p recipe=recipes/tiny-cpu.yaml")
        print(f"               (other shells or --no-profile: source {stack.root / 'env'})")
    elif args.command == "down":
        stack.down()
        stack.restore_profile()
        print("stack stopped")
    elif args.command == "status":
        for name, alive in stack.running().items():
            print(f"{name:16s} {'running' if alive else 'stopped'}")
        if stack.state():
            print(f"api            {stack.state().get('api_url')}")
    else:
        for k, v in stack.client_env().items():
            print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
