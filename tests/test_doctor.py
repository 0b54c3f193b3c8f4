"""`arena doctor` and `arena split`: offline weights lookup, the check table, exit status, the CLI."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from _shared import shared_videos
from click.testing import CliRunner

from arena.cli import main
from arena.data import VIDEO_EXTENSIONS
from arena.doctor import Check, DoctorResult, run_doctor, sniff_container, weights_status


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: the doctor must never wait on the hub."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def tiny_layout(root: Path, n_real: int = 2, n_fake: int = 2, n_test: int = 1) -> Path:
    for sub in ("train/real", "train/fake", "test"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = [f"r{i}.mp4,REAL" for i in range(n_real)] + [f"f{i}.mp4,FAKE" for i in range(n_fake)]
    for i in range(n_real):
        (root / f"train/real/r{i}.mp4").write_bytes(b"\x00")
    for i in range(n_fake):
        (root / f"train/fake/f{i}.mp4").write_bytes(b"\x00")
    for i in range(n_test):
        (root / f"test/t{i}.mp4").write_bytes(b"\x00")
    (root / "train_labels.csv").write_text("video,class\n" + "\n".join(rows) + "\n")
    (root / "test_public.csv").write_text("video\n" + "".join(f"t{i}.mp4\n" for i in range(n_test)))
    return root


def fake_hf_cache(cache: Path, repo: str, filename: str = "model.safetensors") -> Path:
    """The layout huggingface_hub writes: refs/main holds the commit, snapshots/<commit>/<file>."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs/main").write_text("0123abcd")
    snap = repo_dir / "snapshots/0123abcd"
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(b"weights")
    return snap / filename


# --------------------------------------------------------------------------------------------- weights


def test_weights_file_given(tmp_path, no_network):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    assert weights_status("inception_resnet_v2.tf_in1k", f) == (True, f"file:{f}")
    ok, msg = weights_status("inception_resnet_v2.tf_in1k", tmp_path / "nope.pth")
    assert not ok and "nope.pth' does not exist" in msg
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "is empty" in weights_status("resnet18", tmp_path / "empty.pth")[1]
    assert "is a folder" in weights_status("resnet18", tmp_path)[1]


def test_weights_found_in_hf_cache(tmp_path, no_network):
    cached = fake_hf_cache(tmp_path / "hub", "timm/inception_resnet_v2.tf_in1k")
    ok, msg = weights_status("inception_resnet_v2.tf_in1k", hf_cache_dir=tmp_path / "hub")
    assert ok and msg == f"hf-cache:{cached}"


def test_weights_not_reachable_offline(tmp_path, no_network):
    (tmp_path / "hub").mkdir()
    ok, msg = weights_status("inception_resnet_v2.tf_in1k", hf_cache_dir=tmp_path / "hub")
    assert not ok
    assert "not reachable offline" in msg and msg.endswith("use --weights PATH or --no-pretrained")
    assert "timm/inception_resnet_v2.tf_in1k/model.safetensors" in msg
    # a name timm does not know falls back to the timm/<name> hub convention instead of failing
    fake_hf_cache(tmp_path / "hub", "timm/not_a_model.x")
    assert weights_status("not_a_model.x", hf_cache_dir=tmp_path / "hub")[0]


# ---------------------------------------------------------------------------------------- header sniff

def test_sniff_container_on_generated_and_fake_files(tmp_path):
    from arena.demo import write_video

    frames = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    write_video(tmp_path / "v.mp4", frames, fps=5)
    assert sniff_container(tmp_path / "v.mp4") == "mp4/mov"
    (tmp_path / "page.mp4").write_text("<html>404 not found</html>")
    (tmp_path / "zero.mp4").write_bytes(b"")
    assert sniff_container(tmp_path / "page.mp4") is None and sniff_container(tmp_path / "zero.mp4") is None


def test_sniff_container_knows_every_shared_video():
    """Every video of the shared folder and of its sub-folders (faces/) starts like a container."""
    videos = sorted(p for p in shared_videos().rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    assert len(videos) >= 10
    assert [p.name for p in videos if sniff_container(p) is None] == []


def test_doctor_data_check_skips_sub_folders(tmp_path, no_network):
    """A folder among the videos (e.g. faces/ or a folder named like a video) is neither scanned nor sniffed."""
    data = tiny_layout(tmp_path / "data")
    (data / "test/faces").mkdir()
    (data / "test/faces/MANIFEST.tsv").write_text("file\n")
    (data / "train/real/odd.mp4").mkdir()
    result = run_doctor(data, expect=(2, 2, 1))
    rows = {c.name: c for c in result.checks}
    assert rows["data counts"].status == "ok" and "(as expected)" in rows["data counts"].detail
    assert rows["video headers"].status == "warn" and "5 of 5 files" in rows["video headers"].detail


# ------------------------------------------------------------------------------------------------ table


def test_result_ok_and_table():
    res = DoctorResult([Check("torch stack", "ok", "torch 2"), Check("CUDA GPU", "warn", "none")])
    assert res.ok and "all essential checks passed" in res.table()
    res.checks.append(Check("CUDA GPU", "fail", "broken"))  # not essential: still ok
    assert res.ok
    res.checks.append(Check("data layout", "fail", "no train folder", essential=True))
    assert not res.ok
    table = res.table()
    assert "data layout  FAIL    no train folder" in table and "essential checks FAILED" in table
    with pytest.raises(ValueError, match="status must be ok, warn or fail"):
        Check("x", "bad", "")


# -------------------------------------------------------------------------------------------------- CLI


@pytest.mark.slow  # imports torch, torchcodec and timm (seconds on a cold start)
def test_doctor_cli_good_layout(tmp_path, no_network):
    data = tiny_layout(tmp_path / "data")
    w = tmp_path / "w.pth"
    w.write_bytes(b"x")
    res = CliRunner().invoke(main, ["doctor", "--data", str(data), "--weights", str(w), "--expect", "2,2,1"])
    assert res.exit_code == 0, res.output
    out = res.output
    for row in ("data layout", "data counts", "torch stack", "torchcodec + FFmpeg", "ffmpeg CLI", "CUDA GPU", "NVML",
                "backbone weights"):
        assert row in out
    assert "2 real / 2 fake train, 1 test (as expected)" in out
    assert f"file:{w}" in out and "all essential checks passed" in out
    assert "video headers" in out and "5 of 5 files do not start like a video container" in out
    # real videos pass the header check; competition counts by default: a warning, not a failure
    from arena.demo import write_video

    for n, item in enumerate(sorted(data.glob("*/**/*.mp4"))):  # distinct content: identical files are flagged
        write_video(item, np.full((3, 16, 16, 3), 40 * n, dtype=np.uint8), fps=5)
    res = CliRunner().invoke(main, ["doctor", "--data", str(data)])
    assert res.exit_code == 0 and "expected 300 / 300, 200" in res.output
    assert "5 files start like video containers" in res.output


@pytest.mark.slow
def test_doctor_cli_bad_layout_exit_1(tmp_path, no_network):
    data = tiny_layout(tmp_path / "data")
    (data / "train_labels.csv").write_text("clip,y\nr0.mp4,0\n")
    res = CliRunner().invoke(main, ["doctor", "--data", str(data), "--expect", "none"])
    assert res.exit_code == 1
    assert "data layout" in res.output and "FAIL" in res.output
    assert "columns found: 'clip', 'y'" in res.output and "essential checks FAILED" in res.output


@pytest.mark.slow
def test_doctor_cli_without_ffmpeg_libraries_exit_1(tmp_path, monkeypatch, no_network):
    from torchcodec._core import ops

    monkeypatch.setattr(ops, "_FFMPEG_AVAILABLE", False)
    res = CliRunner().invoke(main, ["doctor"])
    assert res.exit_code == 1
    assert "torchcodec + FFmpeg  FAIL" in res.output and "apt-get install ffmpeg" in res.output


def test_doctor_cli_bad_expect():
    res = CliRunner().invoke(main, ["doctor", "--expect", "300,300"])
    assert res.exit_code == 2 and "expected REAL,FAKE,TEST" in res.output


def test_split_cli(tmp_path):
    data = tiny_layout(tmp_path / "data", 10, 10, 0)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["split", "--data", str(data), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "split: train 14 (7 real / 7 fake), val 6 (3 real / 3 fake), seed 42" in res.output
    again = CliRunner().invoke(main, ["split", "--data", str(data), "--out", str(out)])
    assert again.output.splitlines()[-1] == res.output.splitlines()[-1]  # same counts and sha256
    (data / "train/real/r0.mp4").unlink()
    res = CliRunner().invoke(main, ["split", "--data", str(data), "--out", str(out)])
    assert res.exit_code == 1 and "no longer matches" in res.output and "--new-split" in res.output
    res = CliRunner().invoke(main, ["split", "--data", str(data), "--out", str(out), "--new-split"])
    assert res.exit_code == 0 and "train 13 (6 real / 7 fake), val 6 (3 real / 3 fake)" in res.output
    assert "replaced the previous split: cached features stay valid" in res.output
    assert "rerun tune-head, frame-test and train-full" in res.output
    res = CliRunner().invoke(main, ["split", "--data", str(data), "--out", str(out), "--new-split"])
    assert res.exit_code == 0 and "the new split equals the old one; nothing to rerun" in res.output
    res = CliRunner().invoke(main, ["split", "--data", str(data), "--out", str(out), "--val-fraction", "1.5"])
    assert res.exit_code == 2 and "1.5" in res.output


def test_one_default_backbone_everywhere():
    import inspect

    from arena import doctor, model
    from arena.limits import DEFAULT_BACKBONE

    assert inspect.signature(doctor.run_doctor).parameters["backbone"].default == DEFAULT_BACKBONE
    assert inspect.signature(model.create_encoder).parameters["name"].default == DEFAULT_BACKBONE
    for command in ("doctor", "features"):
        res = CliRunner().invoke(main, [command, "--help"])
        assert f"[default: {DEFAULT_BACKBONE}]" in " ".join(res.output.split()), command


def test_doctor_reports_the_face_detector(monkeypatch, no_network):
    from arena.faces import detector_info

    rows = {c.name: c for c in run_doctor().checks}
    info = detector_info("mtcnn")
    assert rows["face detector"].status == ("ok" if info["available"] else "warn")
    assert rows["face detector"].detail.startswith(f"mtcnn: facenet-pytorch {info['version'] or ''}")
    missing = {**info, "version": None, "available": False, "note": "not installed: pip install X"}
    monkeypatch.setattr("arena.faces.detect.detector_info", lambda name: missing)
    row = {c.name: c for c in run_doctor().checks}["face detector"]
    assert row.status == "warn" and not row.essential
    assert row.detail == "mtcnn: facenet-pytorch not installed: pip install X (needed by --crop faces only)"
