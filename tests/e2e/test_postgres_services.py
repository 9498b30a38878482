"""The services' suite, run again on PostgreSQL.

What every connection does is written in SQL that differs by vendor (rooms/services.py): one
statement each on PostgreSQL, one or two on SQLite. The in-process suite runs on SQLite; this
runs its service and selector tests on the session's PostgreSQL database.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.harness import REPO_ROOT

pytestmark = pytest.mark.e2e


def test_services_and_selectors_hold_on_postgres(postgres_url):
    env = {**os.environ, "DATABASE_URL": postgres_url}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_services.py"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout.splitlines()[-1]
