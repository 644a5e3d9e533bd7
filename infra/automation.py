"""The automation that marks flow runs Crashed when their heartbeats stop.

A self-hosted Prefect server does not notice when the process (or pod) running a flow dies: an
evicted or OOM-killed run stays Running forever. Flow runs started by workers emit a
`prefect.flow-run.heartbeat` event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (the stack sets
it); this proactive trigger fires when a run that has sent a heartbeat sends neither another one nor
a terminal state event within `within` seconds, and moves the run to Crashed. A Crashed parent can
then be retried from the UI; a Crashed training child is retried by its parent.

The definition lives in `infra/automations/crash-silent-runs.yaml` (the schema of
`prefect automation create --from-file`); `register_automations` creates or replaces it by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import AutomationCore

AUTOMATIONS_DIR = Path(__file__).resolve().parent / "automations"
CRASH_SILENT_RUNS = AUTOMATIONS_DIR / "crash-silent-runs.yaml"


def load_automation(path: Path = CRASH_SILENT_RUNS, *, within_seconds: int | None = None) -> AutomationCore:
    """The automation in `path`; `within_seconds` overrides how long silence is tolerated."""
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    if within_seconds is not None:
        data["trigger"]["within"] = within_seconds
    return AutomationCore.model_validate(data)


def register_automations(api_url: str, *, within_seconds: int | None = None) -> list[str]:
    """Create (or replace, matched by name) every automation under infra/automations; return their ids."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ids = []
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for path in sorted(AUTOMATIONS_DIR.glob("*.yaml")):
            automation = load_automation(path, within_seconds=within_seconds)
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            ids.append(str(client.create_automation(automation)))
    return ids
