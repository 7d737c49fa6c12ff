"""The privacy cost script, and the README table that it printed."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT, checkout_env

SCRIPT = REPO_ROOT / "examples" / "privacy_cost.py"


def test_readme_table_matches_privacy_cost_script():
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=checkout_env(),
    )

    assert result.returncode == 0, result.stderr
    assert "sample rate 1/12, 180 steps (15 epochs)" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 5  # the header and 2 noise levels x 2 values of log_every
    readme = (REPO_ROOT / "README.md").read_text()
    for row in rows:
        assert row in readme, row
