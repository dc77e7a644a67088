"""Running ``python -m streams.cli`` in a child process, and the fields of alert v1 as the CLI
prints them.
"""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


ALERT_FIELDS = {
    "alert_id", "schema_version", "ts", "emitted_at", "detector", "detector_version", "severity",
    "status", "resolved_at", "model_id", "tenant", "entity_type", "entity", "linked_entities",
    "score", "threshold", "title", "summary", "atlas", "owasp", "evidence", "first_seen",
    "last_seen", "event_count", "sample_event_ids", "incident_id", "runbook",
}  # fmt: skip
