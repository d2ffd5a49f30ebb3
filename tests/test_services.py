"""The rule for services the tests need (tests/servers.py): missing means skipped with a reason, failed under CI.

The rule is exercised in a child pytest on a tiny test module that asks for ``postgres_url`` and ``chromium``
with $POSTGRES_BIN and $CHROMIUM_PATH pointing into an empty directory and PATH holding only that directory:
an explicit setting is the only place the fixtures look, so the real binaries of this machine stay unseen.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from servers import CHROMIUM_PATH_ENV, POSTGRES_BIN_ENV, ServiceNotFound, find_chromium, find_postgres_bin, in_ci

TESTS_DIR = Path(__file__).resolve().parent

PROBE = f"""
import sys
sys.path.insert(0, {str(TESTS_DIR)!r})
from servers import chromium, postgres_url  # noqa: F401


def test_needs_postgres(postgres_url):
    raise AssertionError("postgres_url was set up although initdb is nowhere")


def test_needs_chromium(chromium):
    raise AssertionError(f"chromium was found at {{chromium}} although it is nowhere")
"""


def _run_probe(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir(exist_ok=True)
    (tmp_path / "test_probe.py").write_text(PROBE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this directory is the rootdir: no project settings
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST") and name != "CI"}
    env.update({POSTGRES_BIN_ENV: str(nowhere), CHROMIUM_PATH_ENV: str(nowhere / "chromium"), "PATH": str(nowhere)})
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", "test_probe.py"],
                          check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_missing_service_skips_with_a_reason_saying_how_to_enable_it(tmp_path):
    result = _run_probe(tmp_path, ci=None)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "2 skipped" in output and "failed" not in output and "error" not in output, output
    assert "PostgreSQL server binaries (initdb, pg_ctl) not found (looked in $POSTGRES_BIN=" in output, output
    assert "apt-get install postgresql, or set POSTGRES_BIN" in output, output
    assert "Chromium not found (looked for $CHROMIUM_PATH=" in output, output
    assert "apt-get install chromium, or set CHROMIUM_PATH" in output, output
    skip_lines = [line for line in output.splitlines() if line.startswith("SKIPPED")]
    assert len(skip_lines) == 2, output  # one line each


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_a_missing_service_is_a_failure_never_a_skip(tmp_path, ci):
    result = _run_probe(tmp_path, ci=ci)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "skipped" not in output and "2 errors" in output, output
    assert "apt-get install postgresql, or set POSTGRES_BIN" in output, output
    assert "apt-get install chromium, or set CHROMIUM_PATH" in output, output
    assert f"[CI={ci}: a missing service fails under CI, never skips]" in output, output
    assert "During handling" not in output, output  # the reason alone, not a chained traceback


def _fake_executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_explicit_locations_are_used_and_must_hold_executables(tmp_path, monkeypatch):
    bin_dir = tmp_path / "pg"
    bin_dir.mkdir()
    _fake_executable(bin_dir / "initdb")
    monkeypatch.setenv(POSTGRES_BIN_ENV, str(bin_dir))
    with pytest.raises(ServiceNotFound, match="pg_ctl"):  # initdb alone is not enough
        find_postgres_bin()
    _fake_executable(bin_dir / "pg_ctl")
    assert find_postgres_bin() == bin_dir

    browser = tmp_path / "my-chromium"
    browser.write_text("not executable")
    monkeypatch.setenv(CHROMIUM_PATH_ENV, str(browser))
    with pytest.raises(ServiceNotFound, match="my-chromium"):
        find_chromium()
    _fake_executable(browser)
    assert find_chromium() == browser


@pytest.mark.parametrize("value, expected", [("true", True), ("1", True), ("yes", True), ("", False),
                                             ("0", False), ("false", False), ("False", False), (None, False)])
def test_ci_is_read_from_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert in_ci() is expected
