"""The face stage (`FaceCropper`): synthetic frames with a stand-in detector, then MTCNN on shared face clips."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import torch
from _shared import shared_videos

from arena.clips import ClipDataset
from arena.errors import OptionError
from arena.faces.detect import Detections, detector_info
from arena.faces.stage import FaceCropConfig, FaceCropper
from arena.sampling import uniform_indices, union_indices
from arena.video import decode_selected


@dataclass
class BlobDetector:
    """Stand-in detector: every bright (>200) blob of channel 0 is a face, box = its bounding box."""

    name: str = "blob"
    calls: int = 0

    def detect(self, images: torch.Tensor) -> list[Detections]:
        assert images.dtype == torch.uint8 and images.ndim == 4
        self.calls += 1
        out = []
        for img in images:
            mask = (img[0].numpy() > 200).astype(np.uint8)
            n, _, stats, _ = cv2.connectedComponentsWithStats(mask)
            boxes = [[x, y, x + w, y + h] for x, y, w, h, _ in stats[1:n]]
            out.append(Detections(boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
                                  scores=np.full(n - 1, 0.99, dtype=np.float32)))
        return out


def _video(n=60, h=180, w=320, face=40, faces=lambda i: [(80 + 2 * i, 90)]):
    """n frames (grey) with white squares of side ``face`` centred where ``faces(i)`` says."""
    frames = torch.full((n, 3, h, w), 60, dtype=torch.uint8)
    for i in range(n):
        for cx, cy in faces(i):
            frames[i, :, cy - face // 2 : cy + face // 2, cx - face // 2 : cx + face // 2] = 255
    return frames


def _crop(cropper, video, k, size=(48, 48)):
    """Crop the k uniform frames after decoding only their union with the detection frames (as the cache does)."""
    n = len(video)
    idx = np.union1d(uniform_indices(n, k), cropper.detection_indices(n))
    return cropper.crop(video[torch.from_numpy(idx)], idx, uniform_indices(n, k), size, num_source_frames=n)


def test_crops_follow_a_moving_face_centred():
    cropper = FaceCropper(FaceCropConfig(detect_frames=8, margin=2.0, detect_size=160), detector=BlobDetector())
    out = _crop(cropper, _video(), 24)
    assert out.found and out.crops.shape == (1, 24, 3, 48, 48) and out.num_tracks == 1
    assert out.covered.all() and out.frames_with_face == out.detection_frames == 8
    centre = out.crops[0, :, 0, 18:30, 18:30]
    assert (centre > 200).float().mean() > 0.95  # the face, in the middle of every crop
    assert (out.crops[0, :, 0, :4, :] < 100).all()  # margin 2: background above it
    side = out.boxes[0, :, 2] - out.boxes[0, :, 0]
    assert np.allclose(side, 80, atol=6)  # 2 x 40 px face, detected at half scale and mapped back


def test_box_of_a_frame_does_not_depend_on_the_other_sampled_frames():
    video = _video(n=90)
    cropper = FaceCropper(FaceCropConfig(detect_frames=6), detector=BlobDetector())
    a, b = _crop(cropper, video, 24), _crop(cropper, video, 32)
    wa, wb = uniform_indices(90, 24), uniform_indices(90, 32)
    common = np.intersect1d(wa, wb)
    assert len(common) >= 4
    ia, ib = np.searchsorted(wa, common), np.searchsorted(wb, common)
    assert torch.equal(a.crops[:, ia], b.crops[:, ib])
    np.testing.assert_array_equal(a.boxes[:, ia], b.boxes[:, ib])


def test_same_frames_same_crops_and_duplicates_allowed():
    video = _video()
    cropper = FaceCropper(FaceCropConfig(detect_frames=5), detector=BlobDetector())
    idx = np.arange(60)
    want = np.array([0, 7, 7, 59])
    a = cropper.crop(video, idx, want, (32, 32), num_source_frames=60)
    b = cropper.crop(video.clone(), idx, want, (32, 32), num_source_frames=60)
    assert torch.equal(a.crops, b.crops) and torch.equal(a.crops[:, 1], a.crops[:, 2])


def test_no_face_falls_back_to_the_letterboxed_frame():
    cropper = FaceCropper(FaceCropConfig(detect_frames=4), detector=BlobDetector())
    out = _crop(cropper, _video(faces=lambda i: []), 8, size=(64, 64))
    assert not out.found and out.crops.shape == (1, 8, 3, 64, 64) and np.isnan(out.boxes).all()
    assert "no face found in 4 detection frames" in out.message
    assert (out.crops[..., 14:50, :] == 60).all() and out.crops[..., :13, :].max() == 0  # 320x180 -> 64x36, bars


def test_two_faces_two_tracks_main_is_the_larger():
    video = torch.full((30, 3, 200, 400), 60, dtype=torch.uint8)
    video[:, :, 80:120, 80:120] = 255  # 40 px
    video[:, :, 60:140, 250:330] = 255  # 80 px
    cropper = FaceCropper(FaceCropConfig(detect_frames=6, max_faces=2, margin=1.0), detector=BlobDetector())
    out = _crop(cropper, video, 8)
    assert out.crops.shape[0] == 2 and out.num_tracks == 2
    sides = out.boxes[:, 0, 2] - out.boxes[:, 0, 0]
    assert sides.tolist() == [80.0, 40.0]


def test_bad_input_is_refused_with_a_clear_message():
    video = _video(n=20)
    cropper = FaceCropper(FaceCropConfig(detect_frames=4), detector=BlobDetector())
    idx = np.arange(20)
    with pytest.raises(ValueError, match="uint8 tensor"):
        cropper.crop(video.float(), idx, idx, (32, 32), num_source_frames=20)
    with pytest.raises(ValueError, match=r"wanted frames \[25\]"):
        cropper.crop(video, idx, np.array([25]), (32, 32), num_source_frames=20)
    with pytest.raises(ValueError, match="detection frames .* were not decoded"):
        cropper.crop(video[:10], idx[:10], idx[:5], (32, 32), num_source_frames=20)
    with pytest.raises(ValueError, match="sorted and unique"):
        cropper.crop(video, idx[::-1].copy(), idx, (32, 32), num_source_frames=20)
    with pytest.raises(OptionError, match="smooth must be an odd number"):
        FaceCropConfig(smooth=2)


def test_config_round_trips_with_the_detector_version():
    cfg = FaceCropConfig(margin=1.5, max_faces=2, threshold=0.9)
    d = cfg.to_dict()
    assert d["margin"] == 1.5 and d["detector_version"] == detector_info("mtcnn").get("version")
    assert FaceCropConfig.from_dict(d) == cfg
    with pytest.raises(OptionError, match="unknown face crop setting"):
        FaceCropConfig.from_dict({**d, "size": 3})


def test_cropper_pickles_without_the_detector_it_built(monkeypatch):
    built = []
    monkeypatch.setattr("arena.faces.stage.make_detector", lambda *a, **k: built.append(1) or BlobDetector())
    cropper = FaceCropper(FaceCropConfig(detect_frames=4))
    assert not built  # lazily: nothing built in __init__
    _crop(cropper, _video(n=20), 4)
    assert built == [1]
    clone = pickle.loads(pickle.dumps(cropper))
    assert clone._detector is None and clone.config == cropper.config
    given = FaceCropper(FaceCropConfig(), detector=BlobDetector(name="given"))
    assert pickle.loads(pickle.dumps(given)).detector.name == "given"


# --------------------------------------------------------------------------------------- MTCNN on shared face clips

_SMALL = dict(detect_frames=8, detect_size=320)


def _path(name: str):
    path = shared_videos() / "faces" / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    if not detector_info("mtcnn").get("available"):
        pytest.skip("MTCNN (facenet-pytorch) is not installed")
    return path


def _real(name: str, k: int = 12, size=(80, 80), **config):
    path = _path(name)
    cropper = FaceCropper(FaceCropConfig(**{**_SMALL, **config}))
    clip = decode_selected(path, lambda n: np.union1d(uniform_indices(n, k), cropper.detection_indices(n)))
    n = clip.num_source_frames
    return cropper.crop(clip.frames, clip.frame_indices, uniform_indices(n, k), size, num_source_frames=n), clip


@pytest.mark.parametrize("name", ["real_video_retalking_face1_frontal.mp4", "fake_musetalk_musev_sun.mp4"])
def test_mtcnn_finds_the_face_throughout_and_centres_it(name):
    out, clip = _real(name)
    assert out.found
    assert out.frames_with_face / out.detection_frames >= 0.95
    assert out.covered[0].mean() >= 0.95
    # the crop box is centred on a detected face: inside the frame's face region, side ~ margin x face
    h, w = clip.frames.shape[-2:]
    cx = (out.boxes[0, :, 0] + out.boxes[0, :, 2]) / 2
    cy = (out.boxes[0, :, 1] + out.boxes[0, :, 3]) / 2
    assert ((cx > 0.1 * w) & (cx < 0.9 * w) & (cy > 0.05 * h) & (cy < 0.9 * h)).all()


def test_mtcnn_two_faces_clip_gives_two_tracks():
    out, _ = _real("real_mpiigaze_demo_video04_two_faces.mp4", k=8, max_faces=2)
    assert out.crops.shape[:2] == (2, 8)
    centres = (out.boxes[:, :, 0] + out.boxes[:, :, 2]) / 2
    assert np.abs(np.median(centres[0]) - np.median(centres[1])) > 100  # two different people


def test_mtcnn_crops_are_the_same_from_the_cache_union_and_from_a_submission_decode():
    """The cache decodes 24/32(/48) + detection frames at once, the submission 24 + detection: same 24 crops."""
    path = _path("real_aniportrait_may_pose_ref.mp4")
    cropper = FaceCropper(FaceCropConfig(**_SMALL))

    def crops(counts):
        clip = decode_selected(path, lambda n: np.union1d(union_indices(n, counts), cropper.detection_indices(n)))
        n = clip.num_source_frames
        return cropper.crop(clip.frames, clip.frame_indices, uniform_indices(n, 24), (64, 64), num_source_frames=n)

    cache, submission = crops((24, 32)), crops((24,))
    assert cache.found and torch.equal(cache.crops, submission.crops)
    np.testing.assert_array_equal(cache.boxes, submission.boxes)


# ------------------------------------------------------------------ detections prepared once (FaceCropper.prepare)

@dataclass
class _Item:
    key: str
    path: object
    label: int | None = None


def _shared(*names: str) -> list:
    paths = [shared_videos() / "faces" / n for n in names]
    for p in paths:
        if not p.is_file():
            pytest.skip(f"{p} not found")
    return paths


def test_prepare_detects_once_per_video_and_leaves_an_undecodable_file_unknown(tmp_path):
    paths = _shared("real_aniportrait_may_pose_ref.mp4", "real_video_retalking_face1_frontal.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    detector = BlobDetector()
    cropper = FaceCropper(FaceCropConfig(detect_frames=5, detect_size=160), detector=detector)
    failed = cropper.prepare([*paths, bad, paths[0]], workers=0)
    assert list(failed) == [str(bad)] and "cannot decode" in failed[str(bad)]
    assert cropper.detections(bad) is None and detector.calls == 2  # one batch per video, the duplicate skipped
    assert cropper.prepare(paths) == {} and detector.calls == 2  # known already: nothing decoded or detected
    for p in paths:  # what prepare kept is what detect gives on the decoded detection frames
        clip = decode_selected(p, cropper.detection_indices)
        direct, kept = cropper.detect(clip.frames, clip.num_source_frames), cropper.detections(str(p))
        assert kept.num_source_frames == clip.num_source_frames and len(kept.counts) == 5
        for a, b in zip(direct.per_frame(), kept.per_frame(), strict=True):  # the boxes, then the scores
            assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        assert cropper.detections(p, clip.num_source_frames + 1) is None  # another decode: other detection frames
    clone = pickle.loads(pickle.dumps(cropper))  # what a DataLoader worker gets
    assert np.array_equal(clone.detections(paths[1]).boxes, cropper.detections(paths[1]).boxes)


def test_prepare_in_worker_processes_keeps_the_same_detections():
    paths = _shared("real_aniportrait_may_pose_ref.mp4", "fake_musetalk_musev_sun.mp4")
    config = FaceCropConfig(detect_frames=4, detect_size=160)
    here, there = FaceCropper(config, detector=BlobDetector()), FaceCropper(config, detector=BlobDetector())
    assert here.prepare(paths, workers=0) == there.prepare(paths, workers=2) == {}
    for p in paths:
        a, b = here.detections(p), there.detections(p)
        assert np.array_equal(a.counts, b.counts) and np.array_equal(a.boxes, b.boxes)


def test_clip_dataset_decodes_only_the_sampled_frames_of_a_prepared_video():
    (path,) = _shared("real_video_retalking_face1_frontal.mp4")
    config = FaceCropConfig(detect_frames=6, detect_size=160)
    items = [_Item("face.mp4", path)]
    fresh = ClipDataset(items, size=(48, 48), frames=5, faces=FaceCropper(config, detector=BlobDetector()))
    detector = BlobDetector()
    prepared = ClipDataset(items, size=(48, 48), frames=5, faces=FaceCropper(config, detector=detector))
    prepared.faces.prepare([path])
    n = prepared.faces.detections(path).num_source_frames
    assert len(fresh._decode_indices(n, path)) > 5
    np.testing.assert_array_equal(prepared._decode_indices(n, path), uniform_indices(n, 5))
    a, b = fresh[0], prepared[0]
    assert detector.calls == 1  # prepare's only: the clip was cropped from the kept detections
    assert a.status == b.status == "ok" and torch.equal(a.views, b.views)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.frame_indices, b.frame_indices)


def test_mtcnn_crops_from_prepared_detections_are_the_crops_crop_makes():
    path = _path("real_aniportrait_may_pose_ref.mp4")
    config = FaceCropConfig(detect_frames=4, detect_size=256)
    detecting, prepared = FaceCropper(config), FaceCropper(config)
    assert prepared.prepare([path]) == {}
    clip = decode_selected(path, lambda n: np.union1d(uniform_indices(n, 24), detecting.detection_indices(n)))
    n = clip.num_source_frames
    want = uniform_indices(n, 24)
    expected = detecting.crop(clip.frames, clip.frame_indices, want, (64, 64), num_source_frames=n)
    only = decode_selected(path, lambda n: want)  # no detection frames: a prepared video does not need them
    worker = pickle.loads(pickle.dumps(prepared))  # as a DataLoader worker gets it: no detector, the detections
    got = worker.crop(only.frames, only.frame_indices, want, (64, 64), num_source_frames=n, path=path)
    assert worker._detector is None  # nothing was detected
    assert expected.found and torch.equal(expected.crops, got.crops)
    np.testing.assert_array_equal(expected.boxes, got.boxes)
    assert (expected.message, expected.num_tracks) == (got.message, got.num_tracks)


def test_prepare_isolates_each_video_a_crashed_worker_costs_only_its_video(monkeypatch):
    paths = _shared("real_aniportrait_may_pose_ref.mp4", "fake_musetalk_musev_sun.mp4")
    config = FaceCropConfig(detect_frames=4, detect_size=160)
    monkeypatch.setenv("ARENA_FAULT_INJECT", f"crash:{paths[0].name}")
    cropper = FaceCropper(config, detector=BlobDetector())
    assert cropper.prepare(paths, workers=2) == {str(paths[0]): "decoder crashed (signal 11, SIGSEGV)"}
    assert cropper.detections(paths[0]) is None  # unknown: crop detects on it itself (and fails there, isolated too)
    monkeypatch.delenv("ARENA_FAULT_INJECT")
    clean = FaceCropper(config, detector=BlobDetector())
    assert clean.prepare(paths[1:], workers=0) == {}
    assert np.array_equal(cropper.detections(paths[1]).boxes, clean.detections(paths[1]).boxes)
