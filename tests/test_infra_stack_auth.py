"""The local stack's Prefect API takes only requests carrying the stack's auth string."""

from __future__ import annotations

import base64
import json
import stat
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from infra.stack import Stack


def _post(url: str, auth: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    req = urllib.request.Request(url, data=b"{}", method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_stack_server_and_workers_share_a_private_auth_string(tmp_path: Path) -> None:
    stack = Stack(root=tmp_path / "stack")
    stack._save({"api_url": "http://127.0.0.1:9/api", "ui_url": "http://127.0.0.1:9", "s3_endpoint": "http://127.0.0.1:8"})
    auth = stack.api_auth_string()
    user, password = auth.split(":", 1)
    assert user and len(password) >= 32 and stack.api_auth_string() == auth  # created once, then kept
    assert stat.S_IMODE((stack.root / "prefect-auth").stat().st_mode) == 0o600
    assert stack._server_env()["PREFECT_SERVER_API_AUTH_STRING"] == auth
    assert stack.worker_env()["PREFECT_API_AUTH_STRING"] == auth
    assert stack.client_env()["PREFECT_API_AUTH_STRING"] == auth
    env_file = stack.write_env_file()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600 and auth in env_file.read_text()
    assert Stack(root=tmp_path / "other").api_auth_string() != auth  # one per stack folder


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stack_api_refuses_requests_without_the_auth_string(tmp_path: Path) -> None:
    """A real server started as `up` starts it; the health check alone stays open (for probes)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    stack = Stack(root=tmp_path / "stack", services=False)
    try:
        stack._start_server()
        stack._wait(stack._healthy, "Prefect server", 240, "prefect-server")
        flows = f"{stack.api_url}/flows/filter"
        assert _post(flows, None) == 401
        assert _post(flows, "vinasmol:wrong") == 401
        assert _post(flows, stack.api_auth_string()) == 200
        with temporary_settings(stack.api_settings()), get_client(sync_client=True) as client:
            assert client.read_flows() == []
    finally:
        stack.down()
    assert json.loads(stack.state_file.read_text())["pids"] == {}
