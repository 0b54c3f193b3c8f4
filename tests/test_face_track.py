"""Face tracks and crop geometry on synthetic boxes and frames (no detector, no video)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arena.faces.crop import crop_boxes, cut_boxes, detection_scale, letterbox
from arena.faces.track import FaceTrack, Track, link_tracks, select_faces, smooth_boxes


def _box(cx, cy, s):
    return [cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2]


def _frames(*per_frame):
    """Per detection frame a list of boxes -> (boxes, scores) lists as `link_tracks` takes them."""
    boxes = [np.array(b, dtype=np.float32).reshape(-1, 4) for b in per_frame]
    return boxes, [np.full(len(b), 0.99, dtype=np.float32) for b in boxes]


def _track(positions, boxes):
    return Track(positions=np.array(positions), boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
                 scores=np.ones(len(positions), dtype=np.float32))


def test_moving_face_is_one_track_and_a_second_face_another():
    """A 40 px face moving 30 px between detection frames (plain IoU 0.14) stays one track; its neighbour too."""
    boxes, scores = _frames(*[[_box(100 + 30 * t, 100, 40), _box(400 + 30 * t, 100, 40)] for t in range(8)])
    tracks = link_tracks(boxes, scores)
    assert len(tracks) == 2
    assert all(tr.positions.tolist() == list(range(8)) for tr in tracks)
    assert tracks[0].boxes[:, 0].tolist() == [80 + 30 * t for t in range(8)]
    assert len(link_tracks(boxes, scores, scale=1.0)) == 16  # plain IoU would break it at every frame


def test_a_scene_cut_starts_a_new_track():
    before = [[_box(100, 100, 50)]] * 4
    after = [[_box(500, 300, 50)]] * 4
    tracks = link_tracks(*_frames(*before, *after))
    assert [tr.positions.tolist() for tr in tracks] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_track_survives_a_short_miss_but_not_a_long_one():
    face = [_box(200, 200, 50)]
    short = link_tracks(*_frames(face, face, [], [], face, face))
    assert [tr.positions.tolist() for tr in short] == [[0, 1, 4, 5]]
    long = link_tracks(*_frames(face, face, [], [], [], face))
    assert [tr.positions.tolist() for tr in long] == [[0, 1], [5]]


def test_persistent_face_beats_a_larger_flicker():
    """Crowd/stage shot: a mid-size face in every frame, big passers-by in one frame each at different places."""
    per_frame = []
    for t in range(16):
        frame = [_box(300, 200, 40)]
        if t % 4 == 0:
            frame.append(_box(100 + 150 * (t // 4), 400, 120))  # a big face that appears once, elsewhere each time
        per_frame.append(frame)
    tracks = link_tracks(*_frames(*per_frame))
    assert len(tracks) == 5
    main = select_faces(tracks, 1, num_detection_frames=16)
    assert len(main) == 1 and main[0].positions.tolist() == list(range(16))
    # with max_faces=2 the one-frame faces are not kept as a second "face", even chained together
    assert len(select_faces(tracks, 2, num_detection_frames=16)) == 1
    # only one-frame detections: the strongest is the main face, alone (they are never chained)
    singles = link_tracks(*_frames(*[[_box(100 + 200 * t, 100, 40 + t)] for t in range(4)]))
    (face,) = select_faces(singles, 2, num_detection_frames=4)
    assert face.positions.tolist() == [3]


def test_main_face_is_chained_across_scene_cuts_but_never_hops_between_two_present_faces():
    a = _track([0, 1, 2, 3], [_box(100, 100, 40)] * 4)  # shot 1: a face throughout
    b = _track([0, 1, 2, 3, 4, 5, 6, 7], [_box(400, 100, 30)] * 8)  # a smaller face in both shots
    c = _track([4, 5, 6, 7], [_box(200, 300, 60)] * 4)  # shot 2: a large face
    faces = select_faces([a, b, c], 2, num_detection_frames=8)
    assert [[int(s.positions[0]) for s in f.segments] for f in faces] == [[0, 4], [0]]  # a then c; b second
    det = np.arange(0, 80, 10)
    want = np.array([0, 25, 34, 36, 45, 79])
    cx = faces[0].boxes_at(det, want, smooth=1)[:, 0]
    assert cx.tolist() == [100, 100, 100, 200, 200, 200]  # nearest segment between shots, never a blend
    assert faces[0].covered(det, want).tolist() == [True, True, False, False, True, False]


def test_two_persistent_faces_both_kept_main_first():
    tracks = link_tracks(*_frames(*[[_box(100, 100, 40), _box(400, 100, 80)] for _ in range(6)]))
    kept = select_faces(tracks, 2, num_detection_frames=6)
    assert [float(f.segments[0].boxes[0, 2] - f.segments[0].boxes[0, 0]) for f in kept] == [80.0, 40.0]
    assert select_faces(tracks, 1, num_detection_frames=6)[0] == kept[0]  # the main face ignores max_faces
    assert select_faces([], 2, num_detection_frames=6) == []


def test_smoothing_is_a_centred_moving_average_shrinking_at_the_ends():
    xs = [100, 100, 130, 100, 100]
    tr = _track(range(5), [_box(x, 50, 20) for x in xs])
    cx = smooth_boxes(tr, 3)[:, 0]
    np.testing.assert_allclose(cx, [100, 110, 110, 110, 100])
    np.testing.assert_allclose(smooth_boxes(tr, 1)[:, 0], xs)
    np.testing.assert_allclose(smooth_boxes(tr, 3)[:, 2:], 20)
    np.testing.assert_allclose(smooth_boxes(_track([0, 1], [_box(0, 0, 10), _box(30, 0, 10)]), 7)[:, 0], [15, 15])
    with pytest.raises(ValueError, match="odd"):
        smooth_boxes(tr, 2)


def test_interpolation_is_linear_inside_and_nearest_beyond_the_ends():
    face = FaceTrack((_track([1, 2], [_box(0, 10, 20), _box(100, 20, 40)]),))
    out = face.boxes_at(np.array([0, 10, 20, 30]), np.array([0, 10, 15, 20, 30]), smooth=1)
    np.testing.assert_allclose(out[:, 0], [0, 0, 50, 100, 100])
    np.testing.assert_allclose(out[:, 1], [10, 10, 15, 20, 20])
    np.testing.assert_allclose(out[:, 2], [20, 20, 30, 40, 40])


def test_covered_means_detections_on_both_sides():
    det = np.array([0, 10, 20, 30])
    face = FaceTrack((_track([0, 1, 3], np.zeros((3, 4))),))
    want = np.array([0, 5, 10, 15, 20, 25, 30, 35])
    assert face.covered(det, want).tolist() == [True, True, True, False, False, False, True, False]


def test_crop_box_is_centred_square_with_margin():
    box = crop_boxes(np.array([[100.0, 80.0, 40.0, 60.0]]), 1.5, (64, 64))[0]
    assert (box[2] - box[0], box[3] - box[1]) == (90, 90)
    assert ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2) == (100, 80)
    wide = crop_boxes(np.array([[100.0, 80.0, 40.0, 40.0]]), 1.0, (32, 64))[0]
    assert (wide[2] - wide[0], wide[3] - wide[1]) == (80, 40)  # the input's aspect, face side as the short side


def test_crop_at_the_edge_pads_black_and_keeps_the_face_centred():
    frame = torch.full((1, 3, 100, 200), 50, dtype=torch.uint8)
    frame[0, :, 0:20, 0:20] = 255  # a 20 px "face" in the top-left corner
    box = crop_boxes(np.array([[10.0, 10.0, 20.0, 20.0]]), 2.0, (40, 40))
    assert box.tolist() == [[-10, -10, 30, 30]]
    crop = cut_boxes(frame, np.array([0]), box, (40, 40))[0]
    assert crop.shape == (3, 40, 40)
    assert crop[:, :10, :].max() == 0 and crop[:, :, :10].max() == 0  # black pad above and left
    assert (crop[:, 10:30, 10:30] == 255).all()  # the face, whole, in the centre
    assert (crop[:, 30:, 30:] == 50).all()  # the rest of the frame below/right


def test_letterbox_keeps_the_aspect():
    frames = torch.full((2, 3, 100, 200), 128, dtype=torch.uint8)
    out = letterbox(frames, (64, 64))
    assert out.shape == (2, 3, 64, 64)
    assert (out[:, :, 16:48] == 128).all()
    assert out[:, :, :16].max() == 0 and out[:, :, 48:].max() == 0
    tall = letterbox(torch.full((1, 3, 200, 100), 9, dtype=torch.uint8), (64, 64))
    assert (tall[..., 16:48] == 9).all() and tall[..., :16].max() == 0


def test_detection_scale_never_upscales():
    assert detection_scale(1080, 1920, 640) == (360, 640)
    assert detection_scale(360, 640, 1280) == (360, 640)
    assert detection_scale(1216, 704, 480) == (480, 278)
