"""Face crops through the whole pipeline on real face clips: cache (provenance, boxes), head-only and fine-tuned
submission with ``--verify`` (cache path and full path cut the same pixels), the crop-mode refusal, ``--max-faces``
and the no-face fallback."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from _shared import shared_videos
from _world import BACKBONE, save_head_only
from click.testing import CliRunner

from arena.cache import FeatureCache
from arena.cache.provenance import Provenance
from arena.cli import main
from arena.clips import ClipDataset
from arena.data import load_dataset
from arena.demo import generate_dataset
from arena.faces.modes import crop_provenance, face_cropper
from arena.faces.stage import FaceCropConfig
from arena.features import extract_features
from arena.model import Detector, DetectorHead, create_encoder
from arena.models_folder import FRAME_TEST_FILE, DetectorCheckpoint, finetuned_name

IMAGE_SIZE = 64
FRAMES = 3
CROP = FaceCropConfig(detect_size=256, detect_frames=4)
# name in the data folder -> shared face clip (copied: the data check refuses links that leave the folder)
CLIPS = {
    "train/real/may.mp4": "real_aniportrait_may_pose_ref.mp4",
    "train/real/talk.mp4": "real_video_retalking_face1_frontal.mp4",
    "train/fake/may_nerf.mp4": "fake_geneface_may_radnerf.mp4",
    "train/fake/sun.mp4": "fake_musetalk_musev_sun.mp4",
    "test/two_faces.mp4": "real_mpiigaze_demo_video04_two_faces.mp4",
}
NO_FACE = "test/scene.mp4"  # a generated demo clip: shapes and grain, no face


@dataclass
class FaceWorld:
    data: Path
    cache: Path
    head_only: Path
    finetuned: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> FaceWorld:
    root = tmp_path_factory.mktemp("face_world")
    faces = shared_videos() / "faces"
    data = root / "data"
    for name, clip in CLIPS.items():
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(faces / clip, data / name)
    demo = root / "demo"
    generate_dataset(demo, n_train_real=1, n_train_fake=1, n_test=1, seconds=0.6, size=(96, 64), fps=10, seed=1,
                     workers=1, progress=False)
    shutil.copy(next((demo / "test").glob("*.mp4")), data / NO_FACE)
    cache = root / "features.h5"
    summary = extract_features(data=data, cache=cache, frame_counts=(2, FRAMES), backbone=BACKBONE,
                               pretrained=False, image_size=IMAGE_SIZE, seed=0, device="cpu", workers=0, crop=CROP)
    assert not summary.failed and summary.no_face == [NO_FACE]
    head_only = root / "models"
    head_only.mkdir()
    save_head_only(cache, head_only, frames=FRAMES)
    finetuned = root / "models_ft"
    finetuned.mkdir()
    enc = create_encoder(BACKBONE, pretrained=False, image_size=IMAGE_SIZE, seed=1)
    torch.manual_seed(1)
    head = DetectorHead(enc.feature_dim, attn_dim=16, hidden=16, dropout=0.3)
    cfg = {"backbone": BACKBONE, "image_size": IMAGE_SIZE, "frames": FRAMES, "head": head.config(), "seed": 1,
           "crop": crop_provenance(CROP)}
    DetectorCheckpoint(epoch=1, model_state_dict=Detector(enc, head).state_dict(), config=cfg).save(
        finetuned / finetuned_name(BACKBONE))
    for m in (head_only, finetuned):
        (m / FRAME_TEST_FILE).write_text(json.dumps({"recommended_frames": FRAMES}))
    return FaceWorld(data, cache, head_only, finetuned)


def _detail(out: Path) -> dict[str, dict]:
    with open(out.parent / "predictions_detail.csv", newline="") as fh:
        return {r["key"]: r for r in csv.DictReader(fh)}


def test_cache_records_crop_settings_and_main_track_boxes(world):
    cache = FeatureCache.open(world.cache)
    crop = cache.provenance.crop
    assert crop["mode"] == "faces" and crop["detector"] == "mtcnn" and crop["margin"] == CROP.margin
    assert crop["detector_version"] and "max_faces" not in crop
    for key in CLIPS:
        boxes = cache.boxes(key, FRAMES)
        assert boxes.shape == (FRAMES, 4) and np.isfinite(boxes).all(), key
        side = boxes[:, 2] - boxes[:, 0]
        assert np.allclose(side, boxes[:, 3] - boxes[:, 1], atol=1.0), "square crops"
        assert (side > 40).all(), f"{key}: a face crop of {side.min():.0f} px is not a face in these clips"
    # The aniportrait clip is a tight 512x512 portrait: the face crop is centred in the frame's middle half.
    centre = cache.boxes("train/real/may.mp4", FRAMES)[:, :2] + side[:, None] / 2
    assert ((centre > 128) & (centre < 384)).all()
    assert np.isnan(cache.boxes(NO_FACE, FRAMES)).all()


def test_old_caches_read_as_whole_frames(world):
    prov = FeatureCache.open(world.cache).provenance.to_dict()
    del prov["crop"]
    assert Provenance.from_json(json.dumps(prov)).crop == {"mode": "none"}


def test_cache_path_and_full_path_cut_the_same_crops(world):
    """The union of 3 and 4 uniform frames (cache) and 3 frames alone (submission) give identical pixels."""
    items = [it for it in load_dataset(world.data).train if it.key == "train/fake/sun.mp4"]
    cropper = face_cropper(crop_provenance(CROP))
    union = ClipDataset(items, size=(IMAGE_SIZE, IMAGE_SIZE), frame_counts=(FRAMES, 4), faces=cropper)[0]
    alone = ClipDataset(items, size=(IMAGE_SIZE, IMAGE_SIZE), frames=FRAMES, faces=cropper)[0]
    rows = np.searchsorted(union.frame_indices, alone.frame_indices)
    assert len(union.frame_indices) > FRAMES  # the union really has other frames in it
    assert torch.equal(union.views[:, rows], alone.views)
    np.testing.assert_array_equal(union.boxes[0][rows], alone.boxes[0])


@pytest.mark.parametrize("which", ["head_only", "finetuned"])
def test_submit_verifies_face_crops_against_the_cache(world, tmp_path, which):
    out = tmp_path / "sub" / "PREDICTIONS.CSV"
    res = CliRunner().invoke(main, ["submit", "--data", str(world.data), "--models", str(getattr(world, which)),
                                    "--out", str(out), "--device", "cpu", "--workers", "0",
                                    "--verify", str(world.cache), "--verify-all"])
    assert res.exit_code == 0, res.output
    assert "face crops" in res.output
    assert "face crop boxes of the main track, cache vs full path: max |diff| = 0 px" in res.output
    detail = _detail(out)
    assert detail[NO_FACE]["faces"] == "none" and detail["test/two_faces.mp4"]["faces"] == "found"


def test_submit_refuses_another_crop_mode(world, tmp_path):
    res = CliRunner().invoke(main, ["submit", "--data", str(world.data), "--models", str(world.head_only),
                                    "--out", str(tmp_path / "P.CSV"), "--device", "cpu", "--workers", "0",
                                    "--crop", "none"])
    assert res.exit_code == 1
    assert "was trained on faces (mtcnn" in res.output and "--crop none was asked for" in res.output
    assert not (tmp_path / "P.CSV").exists()


def test_max_faces_scores_every_track_and_takes_the_maximum(world, tmp_path):
    out = tmp_path / "P.CSV"
    res = CliRunner().invoke(main, ["submit", "--data", str(world.data), "--models", str(world.finetuned),
                                    "--out", str(out), "--device", "cpu", "--workers", "0", "--max-faces", "2"])
    assert res.exit_code == 0, res.output
    row = _detail(out)["test/two_faces.mp4"]
    tracks = [float(p) for p in row["p_tracks"].split(";")]
    assert len(tracks) == 2 and float(row["p_fake"]) == pytest.approx(max(tracks), abs=1e-6)
    assert len(_detail(out)[NO_FACE]["p_tracks"].split(";")) == 1  # the letterboxed frame is one "track"


def test_tune_head_checks_the_cache_crop_mode(world, tmp_path):
    res = CliRunner().invoke(main, ["tune-head", "--cache", str(world.cache), "--data", str(world.data),
                                    "--models", str(tmp_path / "m"), "--crop", "none", "--n-trials", "1"])
    assert res.exit_code == 1
    assert "was built with crop faces (mtcnn" in res.output and "arena features --crop none" in res.output
