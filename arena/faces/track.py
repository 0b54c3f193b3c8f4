"""Face tracks: detections on the detection frames linked by IoU, chained across cuts, smoothed, interpolated.

Everything here sees only the detection frames (a fixed set per video and settings), never the frames that are
cropped, so the box of a source frame does not depend on which other frames were sampled: the feature cache
(the union of 24/32/48 samples) and the submission (24) crop identical pixels.

Two levels: a `Track` is one face followed while it stays in place (IoU links, a scene cut ends it); a
`FaceTrack` is a chain of tracks that never overlap in time, chosen to carry the most face (`select_faces`).
On a clip with scene cuts the main face track follows the dominant face of each shot instead of leaving every
other shot cropped at the place where one face used to be; within a shot it cannot hop between two people that
are both there, because their tracks overlap in time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

#: Linking compares boxes grown by this factor about their centres: between detection frames (0.5-1.5 s apart)
#: a walking face moves about its own width, where plain IoU drops to 0; two faces side by side stay apart.
LINK_SCALE = 2.0
#: Grown boxes on consecutive detection frames with at least this IoU are the same face.
LINK_IOU = 0.3
#: Detection frames a track may miss (profile turn, occlusion, motion blur) and still be continued.
MAX_GAP = 2
#: Detections a track needs to be chained into a face track.
MIN_SEGMENT = 2

__all__ = [
    "LINK_IOU",
    "LINK_SCALE",
    "MAX_GAP",
    "MIN_SEGMENT",
    "FaceTrack",
    "Track",
    "link_tracks",
    "select_faces",
    "smooth_boxes",
]


@dataclass(frozen=True)
class Track:
    """One face followed across consecutive detection frames.

    Attributes:
        positions: int64 ``[p]``, increasing positions in the detection sequence (0..D-1) where it was detected.
        boxes: float32 ``[p, 4]`` detected boxes (x1, y1, x2, y2) in source pixels.
        scores: float32 ``[p]`` detector confidences.
    """

    positions: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        p = len(self.positions)
        if p < 1 or self.boxes.shape != (p, 4) or self.scores.shape != (p,):
            raise ValueError(f"a track needs p >= 1 positions, boxes [p, 4] and scores [p]; got {p}, "
                             f"{self.boxes.shape}, {self.scores.shape}")

    @property
    def strength(self) -> float:
        """Persistence times size: the sum over its detections of score x sqrt(box area).

        A face seen in every frame beats a larger one seen once, and a face that flickers in and out (a passer-by,
        a false positive) gathers little, so the main face of a crowd or stage shot is one that stays.
        """
        w = np.clip(self.boxes[:, 2] - self.boxes[:, 0], 0, None).astype(np.float64)
        h = np.clip(self.boxes[:, 3] - self.boxes[:, 1], 0, None).astype(np.float64)
        return float(np.sum(self.scores.astype(np.float64) * np.sqrt(w * h)))

    def __repr__(self) -> str:
        return f"Track(positions={self.positions.tolist()}, strength={self.strength:.1f})"


def _grow(boxes: np.ndarray, scale: float) -> torch.Tensor:
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (scale / 2)
    return torch.from_numpy(np.concatenate([c - half, c + half], 1))


def link_tracks(boxes: Sequence[np.ndarray], scores: Sequence[np.ndarray], *, iou: float = LINK_IOU,
                scale: float = LINK_SCALE, max_gap: int = MAX_GAP) -> list[Track]:
    """Link per-frame detections into tracks, greedily by IoU (of grown boxes) with each track's last box.

    On every detection frame, the open tracks (last seen at most ``max_gap`` frames before the previous one) and
    the detections are paired highest IoU first; a pair below ``iou`` is not linked, and a detection left over
    starts a new track. Deterministic: ties go to the earlier track and the earlier detection.

    Args:
        boxes: per detection frame, float ``[k, 4]`` boxes (x1, y1, x2, y2); ``k`` may be 0.
        scores: per detection frame, float ``[k]``.
        iou: the smallest IoU that links a detection to a track.
        scale: both boxes are grown by this factor about their centres before the IoU (1: plain IoU).
        max_gap: detection frames a track may miss and still be continued.

    Returns:
        The tracks in the order they started.
    """
    if len(boxes) != len(scores):
        raise ValueError(f"boxes and scores must have one entry per detection frame, got {len(boxes)} and "
                         f"{len(scores)}")
    members: list[list[tuple[int, np.ndarray, float]]] = []  # per track: (position, box, score)
    for t, (b, s) in enumerate(zip(boxes, scores, strict=True)):
        b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
        s = np.asarray(s, dtype=np.float32).reshape(-1)
        if len(b) != len(s):
            raise ValueError(f"detection frame {t}: {len(b)} boxes but {len(s)} scores")
        open_ = [i for i, m in enumerate(members) if m[-1][0] >= t - 1 - max_gap]
        taken = np.zeros(len(b), dtype=bool)
        if open_ and len(b):
            last = np.stack([members[i][-1][1] for i in open_])
            ious = box_iou(_grow(last, scale), _grow(b, scale)).numpy()
            used = set()
            for flat in np.argsort(-ious.ravel(), kind="stable"):
                r, c = divmod(int(flat), len(b))
                if ious[r, c] < iou:
                    break
                if r in used or taken[c]:
                    continue
                used.add(r)
                taken[c] = True
                members[open_[r]].append((t, b[c], float(s[c])))
        members += [[(t, b[c], float(s[c]))] for c in np.flatnonzero(~taken)]
    return [Track(positions=np.array([p for p, _, _ in m], dtype=np.int64),
                  boxes=np.stack([x for _, x, _ in m]).astype(np.float32),
                  scores=np.array([s for _, _, s in m], dtype=np.float32)) for m in members]


@dataclass(frozen=True)
class FaceTrack:
    """A face followed through the video: tracks in time order, none overlapping another (one per shot, say)."""

    segments: tuple[Track, ...]

    @property
    def strength(self) -> float:
        return sum(t.strength for t in self.segments)

    @property
    def positions(self) -> np.ndarray:
        """int64 ``[p]``: detection positions (0..D-1) on which this face was detected, increasing."""
        return np.concatenate([t.positions for t in self.segments])

    def boxes_at(self, detection_indices: np.ndarray, want: np.ndarray, smooth: int) -> np.ndarray:
        """float64 ``[T, 4]`` (cx, cy, w, h) at source frames ``want``.

        Each segment's boxes are smoothed (`smooth_boxes`) and interpolated linearly in frame index; a frame
        outside every segment takes the nearest segment's end box, never a blend of two segments (they are
        different shots or people).
        """
        det = np.asarray(detection_indices, dtype=np.int64)
        w = np.asarray(want, dtype=np.int64)
        dist = np.stack([np.maximum(det[t.positions[0]] - w, 0) + np.maximum(w - det[t.positions[-1]], 0)
                         for t in self.segments])
        pick = np.argmin(dist, axis=0)  # ties: the earlier segment
        out = np.empty((len(w), 4))
        for i, t in enumerate(self.segments):
            rows = pick == i
            if rows.any():
                values = smooth_boxes(t, smooth)
                x = det[t.positions].astype(np.float64)
                out[rows] = np.stack([np.interp(w[rows], x, values[:, j]) for j in range(4)], 1)
        return out

    def covered(self, detection_indices: np.ndarray, want: np.ndarray) -> np.ndarray:
        """bool ``[T]``: the box of each wanted frame rests on detections of this face on both sides of it.

        True where the frame is a detection frame on which the face was detected, or lies between two consecutive
        detection frames on both of which it was (in one segment); False where the box was carried over a miss,
        a cut or beyond the ends.
        """
        det = np.asarray(detection_indices, dtype=np.int64)
        w = np.asarray(want, dtype=np.int64)
        hit = np.full(len(det), -1)
        for i, t in enumerate(self.segments):
            hit[t.positions] = i
        right = np.minimum(np.searchsorted(det, w, side="left"), len(det) - 1)  # first detection frame >= w
        on = det[right] == w
        left = np.maximum(right - 1, 0)
        between = ~on & (det[left] < w) & (w < det[right]) & (hit[left] >= 0) & (hit[left] == hit[right])
        return (on & (hit[right] >= 0)) | between

    def __repr__(self) -> str:
        return f"FaceTrack({len(self.segments)} segment(s), positions={self.positions.tolist()})"


def _best_chain(tracks: list[Track]) -> list[int]:
    """Indices of tracks that never overlap in time with the largest total strength (weighted interval scheduling).

    Ties keep the chain found first over tracks ordered by end, then start, then input order: deterministic.
    """
    order = sorted(range(len(tracks)), key=lambda i: (tracks[i].positions[-1], tracks[i].positions[0], i))
    ends = [int(tracks[i].positions[-1]) for i in order]
    best = [0.0] * (len(order) + 1)  # best[j]: best total over the first j tracks in that order
    take = [False] * len(order)
    prev = [0] * len(order)
    for j, i in enumerate(order):
        prev[j] = int(np.searchsorted(ends, int(tracks[i].positions[0]), side="left"))  # tracks ending before it
        with_it = tracks[i].strength + best[prev[j]]
        take[j] = with_it > best[j]
        best[j + 1] = with_it if take[j] else best[j]
    chosen, j = [], len(order)
    while j > 0:
        if take[j - 1]:
            chosen.append(order[j - 1])
            j = prev[j - 1]
        else:
            j -= 1
    return sorted(chosen, key=lambda i: int(tracks[i].positions[0]))


def select_faces(tracks: Sequence[Track], max_faces: int, *, num_detection_frames: int) -> list[FaceTrack]:
    """The main face first, then up to ``max_faces - 1`` more; each the best chain of the tracks left.

    Only tracks detected at least twice are chained (a chain of one-frame detections would hop between
    passers-by); when there is none, the main face is the strongest single detection and there is no other.
    A face beyond the main one must be detected on at least a quarter of the detection frames: with several faces
    every one is scored and the video takes the maximum, so a false positive must not become a "face" to score.
    The main face does not depend on ``max_faces``.
    """
    if max_faces < 1:
        raise ValueError(f"max_faces must be >= 1, got {max_faces}")
    left = [t for t in tracks if len(t.positions) >= MIN_SEGMENT]
    if not left:
        return [FaceTrack((max(tracks, key=lambda t: t.strength),))] if tracks else []  # max: first on ties
    need = max(MIN_SEGMENT, -(-num_detection_frames // 4))
    faces: list[FaceTrack] = []
    while left and len(faces) < max_faces:
        chain = _best_chain(left)
        face = FaceTrack(tuple(left[i] for i in chain))
        if not faces or len(face.positions) >= need:
            faces.append(face)
        left = [t for i, t in enumerate(left) if i not in chain]
    return faces


def smooth_boxes(track: Track, window: int) -> np.ndarray:
    """Centre and size of the track's boxes, each a centred moving average over ``window`` detection points.

    Returns:
        float64 ``[p, 4]`` as (cx, cy, w, h); near the ends the window shrinks to the points there are.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"smooth window must be an odd number >= 1, got {window}")
    b = track.boxes.astype(np.float64)
    cxcywh = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
    i = np.arange(len(b))
    lo, hi = np.maximum(i - window // 2, 0), np.minimum(i + window // 2 + 1, len(b))
    total = np.concatenate([np.zeros((1, 4)), np.cumsum(cxcywh, axis=0)])
    return (total[hi] - total[lo]) / (hi - lo)[:, None]
