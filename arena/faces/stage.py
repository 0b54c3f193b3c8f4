"""The face stage: detect on a fixed set of frames, track, and cut face-centred crops from any decoded frame.

Detection runs on ``uniform_indices(n, detect_frames)`` only, downscaled; tracks, smoothing and the main-track
choice use only those frames; the crop box of any other frame is interpolated from its track. So the crop of a
source frame depends on the video and the settings alone, never on which other frames were sampled: the cache
(24/32/48 frames decoded as one union) and the submission (24 frames) cut the same pixels, which
``submit --verify`` checks.

Because the boxes depend only on (video, settings), a training run detects once: `FaceCropper.prepare` decodes
each video's detection frames, runs the detector and keeps what it found (`VideoDetections`, a few numbers per
frame, in flat arrays that travel with the pickled cropper into the DataLoader workers); `crop` of a known video
then uses them and needs only the frames it cuts.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch.utils.data import Dataset

from arena.errors import OptionError, VideoDecodeError
from arena.faces.crop import crop_boxes, cut_boxes, detection_scale, letterbox
from arena.faces.detect import FaceDetector, detector_info, make_detector
from arena.faces.track import link_tracks, select_faces
from arena.faults import before_decode
from arena.isolation import isolated
from arena.sampling import uniform_indices
from arena.video import decode_selected, resize_frames

__all__ = ["FaceCropConfig", "FaceCropper", "FaceCrops", "VideoDetections"]


@dataclass(frozen=True)
class FaceCropConfig:
    """Every setting that changes the crops; `to_dict` is what the cache and the checkpoint store as provenance.

    Attributes:
        detector: face detector name (`arena.faces.detect.make_detector`).
        margin: side of the crop box over the face's larger side (1.3: 30 % around the face).
        detect_size: long side (px) of the copy the detector sees; never upscaled.
        detect_frames: detection runs on ``uniform_indices(n, detect_frames)`` (unique), the rest is interpolated.
        max_faces: face tracks returned, main first (the video takes the maximum over them).
        min_face: smallest face (px at detection scale) the detector reports.
        threshold: detector confidence threshold; None: the detector's default.
        smooth: moving-average window (odd, in detection points) over a track's centre and size; 1 = none.
    """

    detector: str = "mtcnn"
    margin: float = 1.3
    detect_size: int = 640
    detect_frames: int = 16
    max_faces: int = 1
    min_face: int = 16
    threshold: float | None = None
    smooth: int = 3

    def __post_init__(self) -> None:
        checks = [
            ("margin", self.margin, self.margin >= 1.0, ">= 1.0 (the face must fit in its crop)"),
            ("detect_size", self.detect_size, self.detect_size >= 32, ">= 32"),
            ("detect_frames", self.detect_frames, self.detect_frames >= 1, ">= 1"),
            ("max_faces", self.max_faces, self.max_faces >= 1, ">= 1"),
            ("min_face", self.min_face, self.min_face >= 1, ">= 1"),
            ("threshold", self.threshold, self.threshold is None or 0.0 < self.threshold < 1.0, "in (0, 1) or None"),
            ("smooth", self.smooth, self.smooth >= 1 and self.smooth % 2 == 1, "an odd number >= 1"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise OptionError(f"face crop {name} must be {allowed}, got {value!r}")

    def to_dict(self) -> dict:
        """The settings plus the detector's package and version (a new detector version can move every box)."""
        info = detector_info(self.detector)
        return {**asdict(self), "detector_package": info.get("package"), "detector_version": info.get("version")}

    @classmethod
    def from_dict(cls, d: dict) -> FaceCropConfig:
        """The config `to_dict` wrote (its provenance-only keys are ignored; an unknown key is refused)."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"detector_package", "detector_version"}
        if unknown:
            raise OptionError(f"unknown face crop setting(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class FaceCrops:
    """The crops of one video, one row per face track (main first), and what they rest on.

    Attributes:
        crops: uint8 ``[N, T, 3, size_h, size_w]``; N >= 1 (the letterboxed whole frame when no face was found).
        boxes: float32 ``[N, T, 4]`` crop boxes (x1, y1, x2, y2; x2, y2 exclusive) in source pixels, NaN for the
            letterbox.
        detected: bool ``[N, T]``, True where the frame is a detection frame on which the track was detected.
        covered: bool ``[N, T]``, True where the box rests on detections of the track on both sides of the frame
            (or on the frame itself); False where it was carried over a miss or beyond the track's ends.
        found: False when no face was detected on any detection frame.
        message: one line for logs and reports.
        detection_frames: frames the detector ran on.
        frames_with_face: detection frames with at least one face.
        num_tracks: tracks linked on the detection frames (each returned face track chains one or more of them).
        track_detections: int64 ``[N]``, detection frames on which each returned face track was detected.
    """

    crops: torch.Tensor
    boxes: np.ndarray
    detected: np.ndarray
    covered: np.ndarray
    found: bool
    message: str
    detection_frames: int
    frames_with_face: int
    num_tracks: int
    track_detections: np.ndarray

    def __post_init__(self) -> None:
        c = self.crops
        if not isinstance(c, torch.Tensor) or c.dtype != torch.uint8 or c.ndim != 5 or c.shape[2] != 3:
            raise ValueError(f"crops must be uint8 [N, T, 3, H, W], got {getattr(c, 'dtype', type(c))} "
                             f"{tuple(getattr(c, 'shape', ()))}")
        n, t = c.shape[:2]
        for name, arr, shape in (("boxes", self.boxes, (n, t, 4)), ("detected", self.detected, (n, t)),
                                 ("covered", self.covered, (n, t)), ("track_detections", self.track_detections, (n,))):
            if arr.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")

    def __repr__(self) -> str:
        return (f"FaceCrops(crops={tuple(self.crops.shape)}, found={self.found}, tracks={self.num_tracks}, "
                f"faces on {self.frames_with_face}/{self.detection_frames} detection frames, "
                f"message={self.message!r})")


@dataclass(frozen=True)
class VideoDetections:
    """What the detector found on the detection frames of one video: all `FaceCropper.crop` needs besides the
    frames it cuts.

    Attributes:
        num_source_frames: the n of the decode they come from (the detection frames are ``detection_indices(n)``).
        counts: int32 ``[D]``, faces found on each detection frame.
        boxes: float32 ``[K, 4]`` (x1, y1, x2, y2) in source pixels, frame after frame (``K = counts.sum()``).
        scores: float32 ``[K]``.
    """

    num_source_frames: int
    counts: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        k = int(self.counts.sum())
        if self.boxes.shape != (k, 4) or self.scores.shape != (k,):
            raise ValueError(f"{k} faces on the detection frames need boxes [{k}, 4] and scores [{k}], got "
                             f"{self.boxes.shape} and {self.scores.shape}")

    @classmethod
    def from_frames(cls, num_source_frames: int, boxes: list[np.ndarray], scores: list[np.ndarray]) -> VideoDetections:
        return cls(int(num_source_frames), np.array([len(b) for b in boxes], dtype=np.int32),
                   np.concatenate([np.zeros((0, 4), np.float32), *boxes]).astype(np.float32),
                   np.concatenate([np.zeros(0, np.float32), *scores]).astype(np.float32))

    def per_frame(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Boxes and scores of each detection frame (what `arena.faces.track.link_tracks` takes)."""
        cuts = np.cumsum(self.counts)[:-1]
        return np.split(self.boxes, cuts), np.split(self.scores, cuts)

    def __repr__(self) -> str:
        return f"VideoDetections(n={self.num_source_frames}, faces per detection frame={self.counts.tolist()})"


class _DetectionTable:
    """`VideoDetections` of many videos in five flat arrays and one dict of paths.

    A cropper carries this into every DataLoader worker of every epoch: for a large dataset a handful of arrays
    costs far less (to pickle, and in memory) than one small object per video.
    """

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.num_source_frames = np.zeros(0, dtype=np.int64)
        self.frame_start = np.zeros(1, dtype=np.int64)  # video r: counts[frame_start[r]:frame_start[r + 1]]
        self.box_start = np.zeros(1, dtype=np.int64)  # video r: boxes[box_start[r]:box_start[r + 1]]
        self.counts = np.zeros(0, dtype=np.int32)
        self.boxes = np.zeros((0, 4), dtype=np.float32)
        self.scores = np.zeros(0, dtype=np.float32)

    def add(self, found: dict[str, VideoDetections]) -> None:
        new = {p: d for p, d in found.items() if p not in self.rows}
        if not new:
            return
        dets = list(new.values())
        self.rows.update({p: len(self.rows) + i for i, p in enumerate(new)})
        self.num_source_frames = np.append(self.num_source_frames, [d.num_source_frames for d in dets])
        self.frame_start = np.append(self.frame_start, self.frame_start[-1] + np.cumsum([len(d.counts) for d in dets]))
        self.box_start = np.append(self.box_start, self.box_start[-1] + np.cumsum([len(d.scores) for d in dets]))
        self.counts = np.concatenate([self.counts, *(d.counts for d in dets)])
        self.boxes = np.concatenate([self.boxes, *(d.boxes for d in dets)])
        self.scores = np.concatenate([self.scores, *(d.scores for d in dets)])

    def get(self, path: str) -> VideoDetections | None:
        r = self.rows.get(path)
        if r is None:
            return None
        f, b = slice(*self.frame_start[r : r + 2]), slice(*self.box_start[r : r + 2])
        return VideoDetections(int(self.num_source_frames[r]), self.counts[f], self.boxes[b], self.scores[b])


class FaceCropper:
    """Face-centred crops of decoded frames: ``FaceCropper(config).crop(frames, indices, want, size, ...)``.

    The detector is built on first use, so a cropper can be pickled into DataLoader workers (each builds its
    own); one that was handed in is kept as it is. The detections `prepare` made travel with it.
    """

    def __init__(self, config: FaceCropConfig, *, device: str | torch.device = "cpu",
                 detector: FaceDetector | None = None):
        self.config = config
        self.device = str(device)
        self._detector = detector
        self._built = False  # True once this cropper built the detector itself (then it is not pickled)
        self._known = _DetectionTable()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if state["_built"]:
            state["_detector"], state["_built"] = None, False
        return state

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            c = self.config
            self._detector = make_detector(c.detector, device=self.device, min_face=c.min_face,
                                           threshold=c.threshold)
            self._built = True
        return self._detector

    def detection_indices(self, num_source_frames: int) -> np.ndarray:
        """Sorted unique source frames the detector runs on: ``uniform_indices(n, detect_frames)``."""
        return np.unique(uniform_indices(num_source_frames, self.config.detect_frames))

    def detect(self, frames: torch.Tensor, num_source_frames: int) -> VideoDetections:
        """Run the detector on a video's detection frames, uint8 ``[D, 3, H, W]`` at ``detection_indices(n)``."""
        d = len(self.detection_indices(num_source_frames))
        if frames.shape[0] != d:
            raise ValueError(f"detect takes the {d} detection frames of a {num_source_frames}-frame video, got "
                             f"{frames.shape[0]}")
        return VideoDetections.from_frames(num_source_frames, *self._detect(frames))

    def prepare(self, paths: Iterable[str | os.PathLike], *, workers: int = 0, num_threads: int = 1,
                decode_device: str = "cpu") -> dict[str, str]:
        """Detect faces once per video and keep the result, so `crop` of these videos detects nothing.

        Each video's detection frames are decoded at full resolution (and nothing else), and the detector runs on
        them exactly as `crop` would: the crops are the same bytes whichever did it. Videos already known are
        skipped. Detection runs in ``workers`` supervised processes (`arena.isolation`: a worker that crashes, hangs
        or runs out of memory costs only its video, which is then listed as failed; by ``spawn`` for a CUDA
        detector), in this process when 0 (where any exception of one video is still that video's failure).

        Args:
            paths: video files; they are known by ``str(path)`` afterwards.
            workers: decoding/detecting processes.
            num_threads: FFmpeg threads per decoder.
            decode_device: ``cpu`` or ``cuda``, as `arena.video.decode_selected` takes it.

        Returns:
            ``{path: message}`` of the videos whose detection frames could not be decoded; they stay unknown
            (`crop` then detects on them itself, and a decode fails there as it would have).
        """
        todo = list(dict.fromkeys(str(p) for p in paths if str(p) not in self._known.rows))
        if not todo:
            return {}
        if workers == 0:
            self.detector  # noqa: B018 - build it here, so the helper below shares it instead of building its own
        helper = copy.copy(self)
        helper._known = _DetectionTable()  # the workers need the detector, not what is known already
        loader = isolated(_DetectionFrames(helper, todo, num_threads=num_threads, decode_device=decode_device),
                          range(len(todo)), workers=workers,
                          start_method="spawn" if workers > 0 and self.device.startswith("cuda") else None)
        found, failed = {}, {}
        for path, dets, message in loader:
            if dets is None:
                failed[path] = message
            else:
                found[path] = dets
        self._known.add(found)
        return failed

    def detections(self, path: str | os.PathLike, num_source_frames: int | None = None) -> VideoDetections | None:
        """What `prepare` found for ``path``; None when it is unknown, or was prepared from a decode with another
        frame count than ``num_source_frames`` (then its detection frames were other frames)."""
        found = self._known.get(str(path))
        if found is None or num_source_frames is not None and found.num_source_frames != num_source_frames:
            return None
        return found

    def crop(self, frames: torch.Tensor, indices: np.ndarray, want: np.ndarray, size: tuple[int, int], *,
             num_source_frames: int, path: str | os.PathLike | None = None) -> FaceCrops:
        """Detect (unless ``path`` is known), track and crop.

        Args:
            frames: uint8 ``[M, 3, H, W]`` full-resolution RGB frames at source ``indices``.
            indices: int ``[M]`` sorted unique source indices of ``frames``; must include
                ``detection_indices(num_source_frames)`` unless ``path`` was prepared (`detections`).
            want: int ``[T]`` source frames to crop, each in ``indices`` (any order, duplicates allowed).
            size: (height, width) of each crop (the model input).
            num_source_frames: n, the frames the video has (`DecodedClip.num_source_frames`).
            path: the video file; when `prepare` ran on it, its detections are used instead of detecting.

        Raises:
            ValueError: frames of the wrong type or shape, a wanted or detection frame that was not decoded.
        """
        indices, want, size = _check_inputs(frames, indices, want, size)
        det = self.detection_indices(num_source_frames)
        found = None if path is None else self.detections(path, num_source_frames)
        if found is None:
            missing = det[~np.isin(det, indices)]
            if len(missing):
                raise ValueError(f"detection frames {missing.tolist()} were not decoded: decode the union of the "
                                 f"sampled frames and FaceCropper.detection_indices({num_source_frames})")
            found = self.detect(frames[torch.from_numpy(np.searchsorted(indices, det))], num_source_frames)
        rows = np.searchsorted(indices, want)
        boxes, scores = found.per_frame()
        tracks = link_tracks(boxes, scores)
        faces = select_faces(tracks, self.config.max_faces, num_detection_frames=len(det))
        with_face = sum(len(b) > 0 for b in boxes)
        if not faces:
            return _letterboxed(frames, rows, size, len(det))
        crops, out_boxes, detected, cover = [], [], [], []
        for face in faces:
            box = crop_boxes(face.boxes_at(det, want, self.config.smooth), self.config.margin, size)
            crops.append(cut_boxes(frames, rows, box, size))
            out_boxes.append(box.astype(np.float32))
            detected.append(np.isin(want, det[face.positions]))
            cover.append(face.covered(det, want))
        main = faces[0]
        message = (f"{len(faces)} face track(s) kept of {len(tracks)} track(s); main: detected on "
                   f"{len(main.positions)}/{len(det)} detection frames in {len(main.segments)} segment(s); "
                   f"faces on {with_face}/{len(det)}")
        return FaceCrops(crops=torch.stack(crops), boxes=np.stack(out_boxes), detected=np.stack(detected),
                         covered=np.stack(cover), found=True, message=message, detection_frames=len(det),
                         frames_with_face=with_face, num_tracks=len(tracks),
                         track_detections=np.array([len(f.positions) for f in faces], dtype=np.int64))

    def _detect(self, frames: torch.Tensor) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Boxes (source pixels) and scores per frame, detected on a copy downscaled to ``detect_size``."""
        height, width = frames.shape[-2:]
        small = detection_scale(height, width, self.config.detect_size)
        result = self.detector.detect(resize_frames(frames, small))
        if len(result) != len(frames):
            raise ValueError(f"detector {self.config.detector!r} returned {len(result)} results for "
                             f"{len(frames)} frames")
        scale = np.array([width / small[1], height / small[0]] * 2, dtype=np.float32)
        return ([np.asarray(d.boxes, dtype=np.float32).reshape(-1, 4) * scale for d in result],
                [np.asarray(d.scores, dtype=np.float32).reshape(-1) for d in result])


class _DetectionFrames(Dataset):
    """`FaceCropper.prepare`'s work per video: decode the detection frames, detect; ``(path, found, message)``."""

    def __init__(self, cropper: FaceCropper, paths: list[str], *, num_threads: int, decode_device: str):
        self.cropper, self.paths = cropper, paths
        self.num_threads, self.decode_device = num_threads, decode_device

    def __len__(self) -> int:
        return len(self.paths)

    def failed(self, i: int, message: str) -> tuple[str, None, str]:
        """What stands for video ``i`` when its worker crashed, hung or ran out of memory, or loading it raised."""
        return self.paths[i], None, message

    def __getitem__(self, i: int) -> tuple[str, VideoDetections | None, str]:
        path = self.paths[i]
        before_decode(path)  # the fault switch (`arena.faults`): armed in decode workers only
        try:
            clip = decode_selected(path, self.cropper.detection_indices, size=None, device=self.decode_device,
                                   num_threads=self.num_threads)
        except VideoDecodeError as exc:
            return path, None, str(exc)
        return path, self.cropper.detect(clip.frames.cpu(), clip.num_source_frames), ""


def _check_inputs(frames, indices, want, size) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        got = f"{getattr(frames, 'dtype', type(frames).__name__)} {tuple(getattr(frames, 'shape', ()))}"
        raise ValueError(f"frames must be a uint8 tensor [M, 3, H, W] (RGB), got {got}")
    indices = np.asarray(indices)
    want = np.asarray(want)
    if indices.ndim != 1 or len(indices) != len(frames) or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be {len(frames)} integer source frame indices (one per frame), got "
                         f"{indices.dtype} {indices.shape}")
    if len(indices) > 1 and not np.all(np.diff(indices) > 0):
        raise ValueError("indices must be sorted and unique (decode the union of the frames you need once)")
    if want.ndim != 1 or len(want) == 0 or not np.issubdtype(want.dtype, np.integer):
        raise ValueError(f"want must be a non-empty 1-D array of integer source frame indices, got {want.dtype} "
                         f"{want.shape}")
    absent = np.setdiff1d(want, indices)
    if len(absent):
        raise ValueError(f"wanted frames {absent.tolist()} are not among the decoded indices")
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ValueError(f"size must be (height, width) with positive ints, got {size!r}")
    return indices.astype(np.int64), want.astype(np.int64), (int(size[0]), int(size[1]))


def _letterboxed(frames: torch.Tensor, rows: np.ndarray, size: tuple[int, int], num_det: int) -> FaceCrops:
    t = len(rows)
    return FaceCrops(
        crops=letterbox(frames[torch.from_numpy(rows)], size).unsqueeze(0),
        boxes=np.full((1, t, 4), np.nan, dtype=np.float32), detected=np.zeros((1, t), dtype=bool),
        covered=np.zeros((1, t), dtype=bool), found=False,
        message=f"no face found in {num_det} detection frames: whole frame, letterboxed",
        detection_frames=num_det, frames_with_face=0, num_tracks=0, track_detections=np.zeros(1, dtype=np.int64),
    )
