"""The loopback helpers shared by the local servers and the local stack."""

from __future__ import annotations

import socket
import subprocess
import sys

from vinasmol_core.localserver.localhost import free_ports, pid_alive, port_open, stop_process_group


def test_free_ports_are_distinct_and_port_open_sees_a_listener() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3
    assert not port_open("127.0.0.1", ports[0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))
        s.listen()
        assert port_open("127.0.0.1", ports[0])


def test_stop_process_group_ends_the_whole_group() -> None:
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE)
    try:
        assert leader.stdout is not None
        child = int(leader.stdout.readline())
        assert pid_alive(leader.pid) and pid_alive(child)
        stop_process_group(leader.pid, timeout=5)
        assert not pid_alive(leader.pid) and not pid_alive(child)
        leader.wait(timeout=5)
    finally:
        if leader.poll() is None:
            leader.kill()
    stop_process_group(leader.pid)  # an ended group is not an error
