"""Smoke test of tools/bench_faces.py (the face-crop cost bench): its main function at a tiny scale, so the script
cannot rot. No timed assertions: the numbers only have to be there and add up."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from _shared import shared_videos

from arena.faces.detect import detector_info

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_faces", ROOT / "tools" / "bench_faces.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_bench_prints_the_table_and_writes_the_numbers(tmp_path, capsys):
    faces = shared_videos() / "faces"
    if not detector_info("mtcnn").get("available"):
        pytest.skip("MTCNN (facenet-pytorch) is not installed")
    out = tmp_path / "bench.json"
    result = _bench().main(["--quick", "--backbone", "test_resnet", "--image-size", "64", "--frames", "2",
                            "--videos", "2", "--faces", str(faces), "--json", str(out), "--breakdown"])
    text = capsys.readouterr().out
    assert "| mode | videos | wall s | CPU s (main + workers) | CPU s per video | ratio faces/none |" in text
    assert "load average before" in text and "torch threads" in text
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    none, faces_row = saved["rows"]
    assert none["mode"] == "none" and faces_row["mode"] == "faces[detect_size=256, detect_frames=4]"
    for row in (none, faces_row):
        assert row["videos"] == 2 and row["failed"] == 0 and row["wall_s"] > 0
        assert row["cpu_workers_s"] > 0  # the decoding workers' CPU time is counted (RUSAGE_CHILDREN)
        assert row["cpu_s"] == pytest.approx(row["cpu_main_s"] + row["cpu_workers_s"])
        assert row["cpu_s_per_video"] == pytest.approx(row["cpu_s"] / 2)
    assert none["ratio"] == 1.0 and faces_row["ratio"] == pytest.approx(
        faces_row["cpu_s_per_video"] / none["cpu_s_per_video"])
    assert saved["machine"]["cpu_count"] >= 1 and len(saved["load_before"]) == 3
    assert saved["settings"]["frame_counts"] == [2] and saved["settings"]["views"] == 5
    steps = saved["breakdown"]  # one row per clip and face setting, every step timed
    assert len(steps) == 2 and {r["faces"] for r in steps} == {faces_row["mode"]}
    for r in steps:
        assert r["detection_frames"] == 4 and r["prepare_s"] > 0 and r["decode_faces_s"] > 0 and r["crop_s"] >= 0
    assert "detect once (prepare)" in text
