"""``arena faces``: the report, the strip, and how bad files are reported (MTCNN on a shared face clip)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from _shared import shared_videos
from click.testing import CliRunner

from arena.cli import main
from arena.faces.detect import Detections, detector_info
from arena.faces.report import face_report
from arena.faces.stage import FaceCropConfig, FaceCropper

FRONTAL = "real_video_retalking_face1_frontal.mp4"
SMALL = ["--frames", "6", "--detect-frames", "6", "--detect-size", "320", "--image-size", "64", "--device", "cpu"]


def _clip(name: str):
    path = shared_videos() / "faces" / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def _needs_mtcnn():
    if not detector_info("mtcnn").get("available"):
        pytest.skip("MTCNN (facenet-pytorch) is not installed")


def test_json_report_and_strip_on_a_face_clip_and_an_error_for_a_text_file(tmp_path):
    _needs_mtcnn()
    video = _clip(FRONTAL)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    res = CliRunner().invoke(main, ["faces", str(text), str(video), "--json", "--strip", str(tmp_path / "s"), *SMALL])
    assert res.exit_code == 3, res.output
    bad, good = json.loads(res.output)
    assert bad["file"] == str(text) and bad["status"] == "error" and bad["message"]
    assert "Traceback" not in bad["message"]
    assert good["status"] == "ok", good
    assert good["sampled"] == good["with_face"] == 6 and good["tracks"] >= 1 and good["found"]
    assert good["detection_frames"] == good["detection_frames_with_face"] == 6
    assert 150 < good["box_px"] < 600  # face ~250 px x margin 1.3
    strip = cv2.imread(good["strip"])
    assert strip is not None and strip.shape == (64 + 4, 6 * (64 + 4), 3)  # one row of six 64 px tiles, framed


def test_table_lists_every_video_and_exit_0_when_all_were_read():
    _needs_mtcnn()
    res = CliRunner().invoke(main, ["faces", str(_clip(FRONTAL)), *SMALL])
    assert res.exit_code == 0, res.output
    header, row = res.output.splitlines()[:2]
    assert header.split()[:4] == ["file", "status", "sampled", "with"]
    assert FRONTAL in row and " ok " in row


def test_bad_option_is_refused_before_any_work():
    res = CliRunner().invoke(main, ["faces", "x.mp4", "--margin", "0.5"])
    assert res.exit_code == 2 and "--margin" in res.output


class _Blind:
    name = "blind"

    def detect(self, images):
        return [Detections(boxes=np.zeros((0, 4), np.float32), scores=np.zeros(0, np.float32)) for _ in images]


def test_no_face_is_partial_letterboxed(tmp_path):
    cropper = FaceCropper(FaceCropConfig(detect_frames=3), detector=_Blind())
    (row,) = face_report([_clip(FRONTAL)], frames=4, image_size=48, cropper=cropper, strip_dir=tmp_path)
    assert row["status"] == "partial" and not row["found"] and row["with_face"] == 0 and row["box_px"] is None
    assert "no face found in 3 detection frames" in row["message"]
    assert cv2.imread(row["strip"]).shape == (48 + 4, 4 * (48 + 4), 3)
