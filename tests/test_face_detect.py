"""Face detectors (`arena.faces.detect`): MTCNN on real face clips, empty frames, errors, package facts."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _shared import shared_video

from arena.errors import FaceDetectorUnavailable, OptionError
from arena.faces import DETECTORS, Detections, detector_info, make_detector
from arena.faces.detect import _detections
from arena.video import decode_uniform, resize_frames

# (clip, face height as a fraction of the frame height, per the MANIFEST: May fills ~60 %, the suit ~35 %)
CLIPS = [("real_aniportrait_may_pose_ref.mp4", (0.35, 0.9)), ("real_video_retalking_face1_frontal.mp4", (0.2, 0.6))]
DETECT_SIDE = 320  # both clips are square; the long side the stage would detect at, small to keep the test fast


@pytest.fixture(scope="module")
def mtcnn():
    if not detector_info("mtcnn")["available"]:
        pytest.fail("facenet-pytorch is a base dependency of arena but is not installed; run `make setup`")
    return make_detector("mtcnn")


@pytest.fixture(scope="module", params=CLIPS, ids=[c[0].split("_")[1] for c in CLIPS])
def clip_frames(request):
    name, heights = request.param
    frames = decode_uniform(shared_video(f"faces/{name}"), 3).frames
    return resize_frames(frames, (DETECT_SIDE, DETECT_SIDE)), heights


def test_mtcnn_finds_the_face_of_talking_heads(mtcnn, clip_frames):
    frames, (lo, hi) = clip_frames
    threads = torch.get_num_threads()
    result = mtcnn.detect(frames)
    assert torch.get_num_threads() == threads  # the caller's thread count is left alone
    assert len(result) == len(frames)
    for det in result:
        assert isinstance(det, Detections) and len(det) >= 1, det
        assert np.all(np.diff(det.scores) <= 0) and det.scores[0] > 0.9
        x1, y1, x2, y2 = det.boxes[0]
        height = (y2 - y1) / DETECT_SIDE
        assert lo < height < hi, (det.boxes[0], height)
        cx, cy = (x1 + x2) / 2 / DETECT_SIDE, (y1 + y2) / 2 / DETECT_SIDE
        assert 0.25 < cx < 0.75 and 0.15 < cy < 0.75, (cx, cy)  # a centred talking head, not a corner


def test_mtcnn_is_deterministic(mtcnn, clip_frames):
    frames, _ = clip_frames
    first, again = mtcnn.detect(frames), mtcnn.detect(frames)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_no_face_in_black_noise_or_tiny_frames(mtcnn):
    black = torch.zeros(2, 3, 240, 320, dtype=torch.uint8)
    noise = torch.randint(0, 256, (2, 3, 240, 320), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tiny = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)  # smaller than min_face: nothing to look at
    for images in (black, noise, tiny):
        result = mtcnn.detect(images)
        assert len(result) == len(images) and all(len(d) == 0 for d in result)
        assert all(d.boxes.shape == (0, 4) and d.scores.dtype == np.float32 for d in result)
    assert mtcnn.detect(black[:0]) == []
    with pytest.raises(ValueError, match=r"uint8 tensor \[N, 3, H, W\]"):
        mtcnn.detect(black.float())


def test_dlib_hog_finds_the_frontal_face():
    if not detector_info("dlib-hog")["available"]:
        pytest.skip("dlib-bin (optional extra faces-extra) is not installed")
    frames = resize_frames(decode_uniform(shared_video(f"faces/{CLIPS[1][0]}"), 2).frames, (320, 320))
    result = make_detector("dlib-hog", min_face=40).detect(frames)
    assert [len(d) >= 1 for d in result] == [True, True]
    assert all(0.2 < (d.boxes[0, 3] - d.boxes[0, 1]) / 320 < 0.6 for d in result)
    assert make_detector("dlib-hog").detect(torch.zeros(1, 3, 120, 160, dtype=torch.uint8))[0].boxes.shape == (0, 4)


def test_unknown_name_and_bad_options():
    with pytest.raises(OptionError, match=r"Invalid face detector \(retina\)\. Supported values are mtcnn, "):
        make_detector("retina")
    with pytest.raises(OptionError, match="Supported values are mtcnn"):
        detector_info("retina")
    with pytest.raises(OptionError, match=r"Invalid min_face \(0\)"):
        make_detector("mtcnn", min_face=0)
    with pytest.raises(OptionError, match=r"Invalid threshold \(1.5\) for mtcnn"):
        make_detector("mtcnn", threshold=1.5)
    with pytest.raises(OptionError, match="Invalid device"):
        make_detector("mtcnn", device="gpu")
    assert DETECTORS[0] == "mtcnn"


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # what `import` sees when the package is absent
    with pytest.raises(FaceDetectorUnavailable, match=r"'facenet-pytorch'.*pip install -c constraints.txt"):
        make_detector("mtcnn")
    monkeypatch.setitem(sys.modules, "dlib", None)
    with pytest.raises(FaceDetectorUnavailable, match=r"'dlib-bin'.*pip install 'arena\[faces-extra\]'"):
        make_detector("dlib-hog")


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_info_matches_the_package_metadata(name):
    info = detector_info(name)
    assert set(info) == {"name", "package", "version", "licence", "available", "note"} and info["name"] == name
    if not info["available"]:
        assert info["version"] is None and "pip install" in info["note"]
        return
    meta = importlib.metadata.metadata(info["package"])
    assert info["version"] == meta["Version"]
    stated = " ".join([meta.get("License") or ""] + meta.get_all("Classifier", []))
    assert info["licence"] in stated  # the licence we report is the one the package declares


def test_detections_validate_and_print_shapes():
    det = Detections(boxes=np.zeros((2, 4), np.float32), scores=np.array([0.9, 0.5], np.float32))
    assert len(det) == 2 and repr(det) == "Detections(k=2, top_score=0.900)"
    with pytest.raises(ValueError, match=r"boxes must be float32 \[k, 4\]"):
        Detections(boxes=np.zeros((2, 4)), scores=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match=r"scores must be float32 \[2\]"):
        Detections(boxes=np.zeros((2, 4), np.float32), scores=np.zeros(3, np.float32))


def test_raw_boxes_are_sorted_and_empty_ones_dropped():
    det = _detections([[0, 0, 10, 10], [5, 5, 5, 9], [-3, 1, 3, 3]], [0.5, 0.99, 0.8])
    np.testing.assert_array_equal(det.boxes, np.array([[-3, 1, 3, 3], [0, 0, 10, 10]], np.float32))  # not clipped
    np.testing.assert_array_equal(det.scores, np.array([0.8, 0.5], np.float32))


def test_bench_detectors_runs_and_skips_a_missing_package(tmp_path, monkeypatch, capsys):
    """tools/bench_detectors.py on one clip, two frames: the table, the JSON, and dlib-hog skipped when absent."""
    spec = importlib.util.spec_from_file_location(
        "bench_detectors", Path(__file__).resolve().parents[1] / "tools" / "bench_detectors.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / CLIPS[1][0]).symlink_to(shared_video(f"faces/{CLIPS[1][0]}"))
    monkeypatch.setitem(sys.modules, "dlib", None)
    threads = torch.get_num_threads()
    try:
        code = bench.main(["--videos", str(tmp_path / "clips"), "--frames", "2", "--sizes", "160",
                           "--detectors", "mtcnn,dlib-hog@40", "--json", str(tmp_path / "out.json")])
    finally:
        torch.set_num_threads(threads)  # the bench sets its own thread count
    out = capsys.readouterr().out
    assert code == 0 and "| clip | mtcnn 160px |" in out and "2/2 · " in out and "recall, 1 clips" in out
    assert "skipped: dlib-hog@40 (face detector 'dlib-hog' needs the package 'dlib-bin'" in out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert [(r["detector"], r["size"], r["with_face"]) for r in saved["rows"]] == [("mtcnn", 160, 2)]
    assert saved["summary"][0]["recall"] == 1.0 and saved["summary"][0]["cpu_s_per_frame"] > 0
