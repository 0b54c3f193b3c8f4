"""Smoke tests for the benchmark drivers (tools/bench_all.py, tools/bench_scaling.py, tools/gpu_check.*), so the
scripts cannot rot: tiny scales, real subprocesses, no timed assertions."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_rows_and_targets(tmp_path):
    bench_all = _load("bench_all")
    raw = tmp_path
    (raw / "decode.json").write_text(json.dumps({"rows": [
        {"video": "360p", "gop": 250, "cpu": {"arena": 0.5, "seed": 5.0, "ffmpeg-floor": 0.5}, "wall": {}}]}))
    (raw / "features.json").write_text(json.dumps(dict(arena_fps=30.0, naive_fps=10.0, bare_fps=40.0, videos=2,
                                                       input=[160, 160], cache_bytes_per_video=2**20)))
    rows = bench_all.rows_from(raw, None)
    by = {r["measure"].split(" (")[0]: r for r in rows}
    assert by["decode 24 frames 360p GOP 250 vs seed OpenCV seek"]["met"] is True  # 0.10x <= 0.25x
    assert by["decode 24 frames 360p GOP 250 vs ffmpeg full decode"]["met"] is True  # 1.00x <= 1.05x
    assert by["extraction frames/s vs naive"]["met"] is True  # 3x
    assert by["pipeline frames/s over bare backbone"]["met"] is False  # 0.75 < 0.8
    text = bench_all.render(rows, "hdr")
    assert "| measure | arena | baseline (same run) | ratio | target | met? |" in text and "**no**" in text


def test_scaling_exponent_fit():
    scaling = _load("bench_scaling")
    rows = [dict(stage="decode_length", series="s", x=x, cpu_s=0.1 * x, wall_s=0.0) for x in (2, 5, 15, 60)]
    rows += [dict(stage="tune_trials", series="t", x=x, cpu_s=0.01 * x**2, wall_s=0.0) for x in (2, 4, 8)]
    exps = {e["stage"]: e for e in scaling.exponents(rows)}
    assert exps["decode_length"]["exponent"] == pytest.approx(1.0, abs=1e-6)
    assert not exps["decode_length"]["superlinear"]
    assert exps["tune_trials"]["superlinear"]


def test_bench_all_tiny_tune_step_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_all.py"), "--tiny", "--only", "tune",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary_tiny.json").read_text())
    assert any("200 head trials" in r["measure"] for r in summary["rows"])
    assert (tmp_path / "summary_tiny.md").read_text().count("|") > 10


def test_bench_tune_folds_compares_pruners_against_the_single_split(tmp_path):
    out = tmp_path / "tune.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_tune.py"), "--videos", "60", "--dim", "32",
                           "--frames", "4", "--source-frames", "20", "--epochs", "4", "--trials", "4",
                           "--single-trials", "3", "--folds", "3", "--pruners", "auto,median", "--compare", "1",
                           "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["trials"] == 3
    rows = doc["folds"]["studies"]
    assert [r["pruner"] for r in rows] == ["halving", "median"] and all(r["trials"] == 4 for r in rows)
    single_200 = 200 * doc["cpu_seconds_per_trial"]
    for r in rows:  # the ratio is the K-fold study's CPU time over 200 single-split trials' of the same run
        assert r["ratio_to_200_single_cpu"] == pytest.approx(r["hundred_trials_cpu_s"] / single_200)
    assert "halving (auto)" in proc.stdout and "/ 200 single" in proc.stdout
    assert set(doc["folds"]["side_by_side"]["cpu_s"]) == {"single", "batched", "sequential"}


def test_gpu_check_script_parses_and_cpu_steps_run(tmp_path):
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(ROOT / "tools" / "gpu_check.sh")], check=True)
    gpu_check = _load("gpu_check")
    rc = gpu_check.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--device", "cpu",
                         "--tiny", "--steps", "data,decode"])
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert rc == 0, result
    assert result["steps"]["decode"]["cpu"]["videos"] >= 1
    assert "nvml_before" in result  # read or an error string, never a crash


def test_decode_parallel_bench_runs_each_configuration(tmp_path):
    if not shutil.which("ffmpeg"):
        pytest.skip("the FFmpeg CLI is needed to generate the benchmark's videos")
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_decode_parallel.py"), "--videos", "2",
                           "--codecs", "h264", "--size", "160x96", "--seconds", "0.5", "--frames", "4", "--side", "64",
                           "--configs", "1x1,2x1,1x0", "--out", str(tmp_path / "videos"), "--json", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["results"]["h264"]
    assert [(r["decoders"], r["threads"]) for r in rows] == [(1, 1), (2, 1), (1, 0)]
    assert all(r["videos_per_s"] > 0 for r in rows) and "| 1 × auto |" in proc.stdout
