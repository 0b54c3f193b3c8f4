"""Make recipes chain stages: exit 3 (finished, some videos skipped) lets the next stage run; 1 and 2 stop it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

FAKE_ARENA = """#!/usr/bin/env bash
echo "$1" >> "$ARENA_CALLS"
var="FAKE_EXIT_${1//-/_}"
exit "${!var:-0}"
"""


@pytest.fixture
def fake_venv(tmp_path) -> Path:
    """A venv stand-in whose `arena` records each call and exits as FAKE_EXIT_<command> says; setup is up to date."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    arena = venv / "bin" / "arena"
    arena.write_text(FAKE_ARENA)
    arena.chmod(0o755)
    (venv / "bin" / "python").symlink_to(shutil.which("python3") or "/usr/bin/python3")
    stamp = venv / ".arena-installed"
    stamp.touch()
    newest = max((ROOT / "pyproject.toml").stat().st_mtime, (ROOT / "constraints.txt").stat().st_mtime)
    os.utime(stamp, (newest + 10, newest + 10))
    return venv


def _make(venv: Path, target: str, tmp_path: Path, **exits: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = {**os.environ, "ARENA_CALLS": str(calls), **{f"FAKE_EXIT_{k}": str(v) for k, v in exits.items()}}
    env.pop("ARENA_STRICT", None)
    proc = subprocess.run(["make", "-C", str(ROOT), target, f"VENV={venv}"], capture_output=True, text=True, env=env,
                          timeout=60)
    return proc, calls.read_text().split() if calls.exists() else []


def test_exit_3_does_not_stop_the_chain(fake_venv, tmp_path):
    proc, calls = _make(fake_venv, "tune-head", tmp_path, tune_head=3)
    assert proc.returncode == 0, proc.stderr
    assert calls == ["tune-head", "frame-test"]
    assert "'tune-head' finished with skipped items (exit 3" in proc.stderr


@pytest.mark.parametrize("code", [1, 2])
def test_exit_1_and_2_stop_the_chain(fake_venv, tmp_path, code):
    proc, calls = _make(fake_venv, "tune-head", tmp_path, tune_head=code)
    assert proc.returncode != 0
    assert calls == ["tune-head"]


def test_strict_keeps_exit_3_fatal(fake_venv, tmp_path, monkeypatch):
    monkeypatch.setenv("ARENA_STRICT", "1")
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "ARENA_CALLS": str(calls), "FAKE_EXIT_tune_head": "3"}
    proc = subprocess.run(["make", "-C", str(ROOT), "tune-head", f"VENV={fake_venv}"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode != 0
    assert calls.read_text().split() == ["tune-head"]
