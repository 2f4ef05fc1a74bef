"""The CI switch: with CARRY_ON_REQUIRE_SERVICES=1 (set by .ci/run) a test that lacks its
service (PostgreSQL, a network broker, Chromium) fails instead of skipping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.services import REQUIRE_ENV, service_missing

REPO = Path(__file__).resolve().parents[2]


def test_a_missing_service_skips_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the switch, a test without its service is skipped, saying why."""
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs Redis"):
        service_missing("needs Redis")


def test_a_missing_service_fails_where_services_are_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the switch, the same test fails."""
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="needs Redis"):
        service_missing("needs Redis")


def test_ci_sets_the_switch() -> None:
    """.ci/run requires the services unless told otherwise."""
    script = (REPO / ".ci" / "run").read_text()
    assert f'export {REQUIRE_ENV}="${{{REQUIRE_ENV}:-1}}"' in script
    checked = subprocess.run(["bash", "-n", str(REPO / ".ci" / "run")], check=False)
    assert checked.returncode == 0


def test_a_skipped_integration_test_fails_under_the_switch(tmp_path: Path) -> None:
    """Any skip of a test marked integration or browser, whatever raised it, is a failure
    under the switch (the suite's own conftest turns it into one)."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "import pytest\n\n"
        "@pytest.mark.integration\n"
        "def test_probe():\n"
        '    pytest.skip("no broker here")\n'
    )
    env = {"PATH": "/usr/bin:/bin", REQUIRE_ENV: "1", "DATABASE_URL": "postgres://x/y"}
    env["DJANGO_SETTINGS_MODULE"] = "webapp.settings.test"
    command = [sys.executable, "-m", "pytest", str(probe), "-q", "-p", "no:cacheprovider"]
    command += ["-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO), "-p", "tests.conftest"]
    run = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed" in run.stdout, run.stdout
    assert "no broker here" in run.stdout
