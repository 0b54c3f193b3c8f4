"""The submission CSV: validation, atomic writes, verification, bad videos, determinism and kill -9."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _shared import shared_video
from _world import FRAMES, World, build_world
from click.testing import CliRunner

import arena.submit
from arena._files import atomic_write_text
from arena.cli import main
from arena.errors import SubmissionError
from arena.predict import VideoPrediction
from arena.submit import format_submission, label_and_confidence, make_submission, validate_submission, write_submission


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.getbasetemp())


def _names(data: Path) -> list[str]:
    with open(data / "test_public.csv", newline="") as fh:
        return [r["filename"] for r in csv.DictReader(fh)]


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------------ unit checks


def test_label_and_confidence():
    assert label_and_confidence(0.8) == (1, 0.8)
    assert label_and_confidence(0.2) == (0, 0.8)
    assert label_and_confidence(0.5) == (0, 0.5)
    with pytest.raises(SubmissionError, match=r"p_fake must be in \[0, 1\], got nan"):
        label_and_confidence(float("nan"))
    assert format_submission(["a.mp4", "b.mp4"], [0.9, 0.1234567]) == (
        "filename,label,probability\na.mp4,1,0.900000\nb.mp4,0,0.876543\n")


@pytest.mark.parametrize(
    ("text", "failed"),
    [
        ("filename,label,probability\na.mp4,1,0.9\nb.mp4,0,0.7\n", set()),
        ("file,label,probability\na.mp4,1,0.9\nb.mp4,0,0.7\n", {"header"}),
        ("filename,label,probability\na.mp4,1,0.9\n", {"row count", "every filename exactly once",
                                                       "order of test_public.csv"}),
        ("filename,label,probability\nb.mp4,0,0.7\na.mp4,1,0.9\n", {"order of test_public.csv"}),
        ("filename,label,probability\na.mp4,1,0.9\na.mp4,0,0.7\n", {"every filename exactly once",
                                                                     "order of test_public.csv"}),
        ("filename,label,probability\na.mp4,,0.9\nb.mp4,0,0.7\n", {"no missing values", "labels in {0, 1}"}),
        ("filename,label,probability\na.mp4,2,0.9\nb.mp4,0,0.7\n", {"labels in {0, 1}"}),
        ("filename,label,probability\na.mp4,1,1.5\nb.mp4,0,nan\n", {"probabilities in [0, 1]"}),
        ("filename,label,probability\na.mp4,1,0.3\nb.mp4,0,0.7\n",
         {"probabilities >= 0.5 (confidence of the predicted class)"}),
    ],
)
def test_validation_checks(text, failed):
    checks = validate_submission(text, ["a.mp4", "b.mp4"])
    assert {c.name for c in checks if not c.ok} == failed


def test_failed_validation_leaves_previous_csv_untouched(tmp_path, capsys):
    out = tmp_path / "PREDICTIONS.CSV"
    out.write_bytes(b"previous complete file\n")
    preds = [VideoPrediction("test/a.mp4", 0.7), VideoPrediction("test/b.mp4", 0.2)]
    with pytest.raises(SubmissionError, match="every filename exactly once.*previous CSV was left untouched"):
        write_submission(preds, ["a.mp4", "a.mp4"], out, variants=("original",))
    assert out.read_bytes() == b"previous complete file\n"
    assert not (tmp_path / "predictions_detail.csv").exists()
    assert "[FAIL] every filename exactly once" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PREDICTIONS.CSV"]  # no temporary left behind
    with pytest.raises(SubmissionError, match="1 predictions for 2 test videos"):
        write_submission(preds[:1], ["a.mp4", "b.mp4"], out, variants=("original",))


# -------------------------------------------------------------------------------------------- the full path


def test_submit_head_only_is_valid_ordered_and_verified(world, tmp_path):
    out = tmp_path / "sub" / "PREDICTIONS.CSV"
    res = CliRunner().invoke(main, ["submit", "--data", str(world.data), "--models", str(world.models), "--out",
                                    str(out), "--verify", str(world.cache), "--verify-all", "--workers", "2",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for check in ("row count", "every filename exactly once", "labels in {0, 1}", "probabilities in [0, 1]"):
        assert f"[ok] {check}" in res.output
    assert "p_fake from cached features vs full path on 4 videos: max |diff|" in res.output
    assert "rows that needed a fallback: 0" in res.output
    rows = _read(out)
    assert [r["filename"] for r in rows] == _names(world.data)
    assert out.read_text().splitlines()[0] == "filename,label,probability"
    detail = _read(out.parent / "predictions_detail.csv")
    assert [d["filename"] for d in detail] == _names(world.data)
    for r, d in zip(rows, detail, strict=True):
        p = float(d["p_fake"])
        assert float(r["probability"]) == pytest.approx(max(p, 1 - p), abs=1e-6)
        assert r["label"] == str(int(p > 0.5))
        assert np.mean([float(d[f"p_{v}"]) for v in ("original", "hflip", "shift_scale_rotate", "brightness_up",
                                                       "brightness_down")]) == pytest.approx(p, abs=2e-6)
        assert d["frames_used"] == str(FRAMES) and d["status"] == "ok" and d["fallback"] == "none"


def test_submit_user_errors_are_one_line_messages(world: World, tmp_path):
    out = tmp_path / "P.CSV"
    common = ["submit", "--data", str(world.data), "--out", str(out), "--workers", "0"]
    res = CliRunner().invoke(main, [*common, "--models", str(tmp_path / "empty")])  # a ModelsError
    assert res.exit_code == 1 and f"Error: no model in {tmp_path / 'empty'}" in res.output
    res = CliRunner().invoke(main, [*common, "--models", str(world.models), "--verify", str(tmp_path / "no.h5")])
    assert res.exit_code == 1 and f"Error: --verify {tmp_path / 'no.h5'}" in res.output  # a SubmissionError
    res = CliRunner().invoke(main, [*common, "--models", str(world.models), "--frame-batch", "0"])
    assert res.exit_code == 2 and "0 is not in the range 1<=x<=4096" in res.output
    res = CliRunner().invoke(main, [*common, "--models", str(world.models), "--frames", "513"])
    assert res.exit_code == 2 and "513 is not in the range 1<=x<=512" in res.output
    assert "Traceback" not in res.output and not out.exists()


def test_same_seed_gives_byte_identical_csv(world, tmp_path):
    a, b = tmp_path / "a" / "P.CSV", tmp_path / "b" / "P.CSV"
    make_submission(data=world.data, models=world.models, out=a, seed=7, workers=0, device="cpu", progress=False,
                    echo=None)
    make_submission(data=world.data, models=world.models, out=b, seed=7, workers=2, device="cpu", progress=False,
                    echo=None)
    assert a.read_bytes() == b.read_bytes()
    assert (a.parent / "predictions_detail.csv").read_bytes() == (b.parent / "predictions_detail.csv").read_bytes()


def _data_with_extra_test_videos(world: World, folder: Path, extra: dict[str, bytes | None]) -> Path:
    """A copy of the world's data with ``extra`` test videos (None: listed in test_public.csv but absent)."""
    data = folder / "data"
    shutil.copytree(world.data, data)
    for name, content in extra.items():
        if content is not None:
            (data / name).write_bytes(content)
    with open(data / "test_public.csv", "a") as fh:
        fh.writelines(f"{name}\n" for name in extra)
    return data


def test_truncated_audio_only_and_missing_files_get_rows(world: World, tmp_path):
    good = (world.data / "test" / "test_0001.mp4").read_bytes()
    audio = tmp_path / "audio_only.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
                    "-c:a", "aac", str(audio)], check=True)
    data = _data_with_extra_test_videos(world, tmp_path, {
        "test/truncated.mp4": good[: len(good) // 3],  # the moov atom is at the end: nothing is readable
        "test/audio_only.mp4": audio.read_bytes(),
        "test/listed_but_missing.mp4": None,
    })
    out = tmp_path / "P.CSV"
    res = CliRunner().invoke(main, ["submit", "--data", str(data), "--models", str(world.models), "--out", str(out),
                                    "--workers", "2", "--device", "cpu"])
    assert res.exit_code == 3, res.output  # complete and valid, but some rows carry no prediction
    rows = {r["filename"]: r for r in _read(out)}
    detail = {d["filename"]: d for d in _read(tmp_path / "predictions_detail.csv")}
    assert list(rows) == _names(data) and len(rows) == 4 + 3
    for name in ("test/truncated.mp4", "test/audio_only.mp4"):
        d = detail[name]
        assert rows[name]["probability"] == "0.500000" and rows[name]["label"] == "0"
        assert d["status"] == "failed" and d["fallback"] == "0.5 (decode failed)"
        assert d["error"].startswith(f"cannot decode {data / name}")
    missing = detail["test/listed_but_missing.mp4"]
    assert missing["fallback"] == "0.5 (missing file)" and missing["status"] == "failed" and missing["error"]
    assert all(detail[f"test/test_000{i}.mp4"]["status"] == "ok" for i in range(1, 5))
    assert "rows that needed a fallback: 3" in res.output
    assert "3 row(s) are 0.5 because the video could not be predicted" in res.output


def test_corrupted_h264_that_ffmpeg_decodes_gets_a_real_prediction(world: World, tmp_path):
    """A real-world H.264 file with a corrupted packet (torchcodec refuses it; FFmpeg decodes 49 of 50 frames)."""
    corrupted = shared_video("decord_corrupted.mp4")
    data = _data_with_extra_test_videos(world, tmp_path, {"test/corrupted.mp4": corrupted.read_bytes()})
    res = make_submission(data=data, models=world.models, out=tmp_path / "P.CSV", workers=0, device="cpu",
                          progress=False, echo=None)
    pred = res.predictions[-1]
    assert pred.key == "test/corrupted.mp4" and pred.status != "failed" and pred.fallback == "none"
    assert pred.frames_used == FRAMES and len(pred.variant_p) == 5 and pred.num_source_frames >= 49
    assert _read(tmp_path / "predictions_detail.csv")[-1]["status"] == pred.status


def test_all_videos_failing_is_an_error_and_keeps_previous(world, tmp_path, monkeypatch):
    real_load = arena.submit.load_model

    def broken_load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        monkeypatch.setattr(model.encoder, "forward", lambda frames: (_ for _ in ()).throw(ValueError("bug")))
        return model

    monkeypatch.setattr(arena.submit, "load_model", broken_load)
    out = tmp_path / "P.CSV"
    out.write_text("previous\n")
    with pytest.raises(SubmissionError, match="every one of 4 test videos failed"):
        make_submission(data=world.data, models=world.models, out=out, workers=0, device="cpu", progress=False,
                        echo=None)
    assert out.read_text() == "previous\n"


def test_injected_oom_in_submit_still_writes_the_row(world, tmp_path, monkeypatch):
    real_load = arena.submit.load_model

    def oom_once_load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        original, state = model.encoder.forward, {"raised": False}

        def forward(frames):
            if not state["raised"]:
                state["raised"] = True
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            return original(frames)

        monkeypatch.setattr(model.encoder, "forward", forward)
        return model

    monkeypatch.setattr(arena.submit, "load_model", oom_once_load)
    out = tmp_path / "P.CSV"
    res = make_submission(data=world.data, models=world.models, out=out, workers=0, device="cpu", progress=False,
                          echo=None)
    assert len(_read(out)) == 4 and res.report.fallbacks == {"retry": 1}
    assert _read(tmp_path / "predictions_detail.csv")[0]["fallback"] == "retry"


# --------------------------------------------------------------------------------------------- interruption

_WRITER = """
import sys
from pathlib import Path
from arena._files import atomic_write_text
out, a, b = sys.argv[1], Path(sys.argv[2]).read_text(), Path(sys.argv[3]).read_text()
print("ready", flush=True)
i = 0
while True:
    atomic_write_text(out, a if i % 2 else b)
    i += 1
"""


@pytest.mark.slow  # kills and restarts writers at random moments
def test_atomic_write_survives_kill9_at_random_moments(tmp_path):
    """kill -9 while the CSV is being replaced over and over: the file is always one complete version."""
    out = tmp_path / "PREDICTIONS.CSV"
    versions = {"filename,label,probability\n" + "".join(f"v{v}_{i}.mp4,1,0.9\n" for i in range(20000))
                for v in (1, 2)}
    a, b = sorted(versions)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text(a)
    (src / "b").write_text(b)
    out.write_text(a)
    rng = np.random.default_rng(20260101)
    for delay in rng.uniform(0.05, 0.6, size=4):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out), str(src / "a"), str(src / "b")],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(delay))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert out.read_text() in versions
    atomic_write_text(out, a)  # the next write removes the temporaries the killed writers left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PREDICTIONS.CSV", "src"]


@pytest.mark.slow  # kills and restarts writers at random moments
def test_submit_kill9_then_rerun_completes(world, tmp_path):
    """kill -9 of `arena submit` at a seeded random moment: previous or complete CSV; the rerun completes."""
    reference = tmp_path / "ref" / "P.CSV"
    make_submission(data=world.data, models=world.models, out=reference, workers=0, device="cpu", progress=False,
                    echo=None)
    out = tmp_path / "sub" / "P.CSV"
    out.parent.mkdir()
    previous = b"filename,label,probability\nprevious.mp4,0,0.500000\n"
    out.write_bytes(previous)
    cmd = [sys.executable, "-m", "arena", "submit", "--data", str(world.data), "--models", str(world.models),
           "--out", str(out), "--workers", "2", "--device", "cpu"]
    rng = np.random.default_rng(8)
    for delay in rng.uniform(1.0, 6.0, size=2):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(float(delay))
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the submit process and its decoding workers
        except ProcessLookupError:  # it had already finished: the CSV must then be the complete new one
            pass
        proc.wait()
        assert out.read_bytes() in (previous, reference.read_bytes())
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_bytes() == reference.read_bytes()
