"""Helpers for the servers the project starts on the loopback interface (SeaweedFS, Prefect)."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports free on `host` right now (held open together while choosing)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def server_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host`, for a server that another process starts and binds later: drawn
    below the kernel's ephemeral range, so that no outgoing connection takes it in the meantime
    (a port from `free_ports` lies inside that range)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(64):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    return free_ports(1, host)[0]


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on `host:port` (half a second to answer)."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether a plain-HTTP GET of `url` answers 200. Cheap enough to poll: unlike an httpx client,
    it builds no TLS context (about 80 ms of CPU each, taken from the server being waited for)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """`preexec_fn` for a server child: ask Linux to send it SIGTERM when the process that started
    it dies, even by SIGKILL, so that no server outlives the command that needed it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; reaps it. Does nothing if it has exited."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a zombie child of ours is reaped here)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as dead
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def stop_process_group(pid: int, timeout: float = 20.0) -> None:
    """Stop the process group led by `pid` (a server started with `start_new_session`, possibly by
    another process): SIGTERM, then SIGKILL after `timeout` seconds, waiting up to 5 s more."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.2)
