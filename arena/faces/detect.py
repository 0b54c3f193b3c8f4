"""Face detectors that ship their weights inside a PyPI package: one contract, a registry, and what is installed.

``make_detector(name)`` returns an object whose ``detect(images)`` takes a batch of equally sized uint8 RGB frames
``[N, 3, H, W]`` and gives one `Detections` per frame: boxes ``x1, y1, x2, y2`` in the pixels of the frames it was
given, sorted by score. The detector does not resize: the caller hands in a downscaled copy and maps boxes back.

Detectors (`DETECTORS`, the first is the default):

- ``mtcnn``: MTCNN (P-, R-, O-net cascade) from ``facenet-pytorch`` (MIT), whose wheel carries the weights.
  Batched, CPU or CUDA. A base dependency.
- ``dlib-hog``: dlib's HOG + linear SVM frontal face detector from ``dlib-bin`` (Boost licence), compiled into the
  library (no weights file). CPU only, one frame at a time, frontal faces only. Optional: ``pip install
  'arena[faces-extra]'``; kept for the comparison in tools/bench_detectors.py.

The packages are imported when a detector is made, by module name from the registry, so a missing optional
package is reported as `FaceDetectorUnavailable` with the pip command instead of breaking ``import arena.faces``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from arena.errors import FaceDetectorUnavailable, OptionError
from arena.runtime import resolve_device

__all__ = ["DETECTORS", "Detections", "FaceDetector", "detector_info", "make_detector"]


@dataclass(frozen=True)
class _Backend:
    """What a detector name stands for: the distribution that provides it and how to install it."""

    package: str  # distribution name on PyPI
    module: str  # what to import
    licence: str  # as the package metadata states it (checked by tests/test_face_detect.py)
    install: str
    note: str


_BACKENDS = {
    "mtcnn": _Backend("facenet-pytorch", "facenet_pytorch", "MIT",
                      "pip install -c constraints.txt 'facenet-pytorch>=2.5.3,<2.6'",
                      "MTCNN P/R/O-net cascade, weights inside the wheel; batched, CPU or CUDA"),
    "dlib-hog": _Backend("dlib-bin", "dlib", "Boost Software License", "pip install 'arena[faces-extra]'",
                         "HOG + linear SVM frontal faces, built into dlib; CPU only, one frame at a time"),
}

#: Names `make_detector` accepts; the first is the default.
DETECTORS: tuple[str, ...] = tuple(_BACKENDS)

# MTCNN's own stage thresholds (P-, R-, O-net); ``threshold`` replaces the last, which decides what is reported.
_MTCNN_THRESHOLDS = (0.6, 0.7, 0.7)
# dlib's frontal detector scans an 80x80 window; each 2x upsampling of the frame halves the smallest face it finds.
_DLIB_WINDOW = 80


@dataclass(frozen=True)
class Detections:
    """Faces found in one image: ``boxes`` float32 ``[k, 4]`` (x1, y1, x2, y2, pixels), ``scores`` float32 ``[k]``.

    Sorted by score, highest first. Boxes are not clipped to the image (a face cut by the frame edge may reach a
    little past it); every box has a positive width and height.
    """

    boxes: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        b, s = self.boxes, self.scores
        if not isinstance(b, np.ndarray) or b.dtype != np.float32 or b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes must be float32 [k, 4], got {getattr(b, 'dtype', type(b).__name__)} "
                             f"{getattr(b, 'shape', None)}")
        if not isinstance(s, np.ndarray) or s.dtype != np.float32 or s.shape != (len(b),):
            raise ValueError(f"scores must be float32 [{len(b)}], got {getattr(s, 'dtype', type(s).__name__)} "
                             f"{getattr(s, 'shape', None)}")

    def __len__(self) -> int:
        return len(self.boxes)

    def __repr__(self) -> str:
        top = f"{self.scores[0]:.3f}" if len(self) else "None"
        return f"Detections(k={len(self)}, top_score={top})"


class FaceDetector(Protocol):
    """The contract every detector honours (the face stage and its tests rely on nothing else)."""

    name: str

    def detect(self, images: torch.Tensor) -> list[Detections]:
        """One `Detections` per image of a uint8 ``[N, 3, H, W]`` RGB batch (any device)."""
        ...


def _detections(boxes, scores) -> Detections:
    """Float32 boxes with positive width and height, sorted by score (stable, so equal scores keep their order)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores = boxes[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")
    return Detections(boxes=np.ascontiguousarray(boxes[order]), scores=np.ascontiguousarray(scores[order]))


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}"
        raise ValueError(f"images must be a uint8 tensor [N, 3, H, W] (RGB), got {got}")


class MtcnnDetector:
    """facenet-pytorch's MTCNN on a batch: one cascade pass for all frames, on the device the model lives on."""

    name = "mtcnn"

    def __init__(self, module, *, device: torch.device, min_face: int, threshold: float | None):
        thresholds = [*_MTCNN_THRESHOLDS[:2], _MTCNN_THRESHOLDS[2] if threshold is None else float(threshold)]
        # keep_all: every face, not only the largest; post_process only concerns the crops forward() returns.
        self.model = module.MTCNN(keep_all=True, device=device, min_face_size=min_face, thresholds=thresholds,
                                  post_process=False, select_largest=False).eval()
        self.device = device
        self.min_face = min_face

    def detect(self, images: torch.Tensor) -> list[Detections]:
        _check_images(images)
        n, _, h, w = images.shape
        if n == 0:
            return []
        if min(h, w) < self.min_face:  # the cascade's image pyramid would be empty (facenet-pytorch fails on it)
            return [_detections([], []) for _ in range(n)]
        # MTCNN.detect takes channels-last [N, H, W, 3] and moves it to its device; the cascade itself is
        # deterministic there (no sampling, NMS with fixed tie-breaking), so the same frames give the same boxes.
        # One thread: the R- and O-net stages loop in Python over candidate boxes with one tiny resize each, where
        # extra threads only add overhead (measured: 2-4x the CPU time with 2 threads for the same boxes).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            boxes, probs = self.model.detect(images.permute(0, 2, 3, 1))
        finally:
            torch.set_num_threads(threads)
        return [_detections([] if b is None else b, [] if b is None else p) for b, p in zip(boxes, probs, strict=True)]


class DlibHogDetector:
    """dlib's frontal face detector, frame by frame on the CPU, upsampled until ``min_face`` fits its window."""

    name = "dlib-hog"

    def __init__(self, module, *, min_face: int, threshold: float | None):
        self.model = module.get_frontal_face_detector()
        self.upsample = max(0, math.ceil(math.log2(_DLIB_WINDOW / min_face)))
        self.threshold = 0.0 if threshold is None else float(threshold)

    def detect(self, images: torch.Tensor) -> list[Detections]:
        _check_images(images)
        out = []
        for img in images.permute(0, 2, 3, 1).contiguous().cpu().numpy():
            rects, scores, _ = self.model.run(img, self.upsample, self.threshold)
            # dlib rectangles are inclusive (right/bottom is the last pixel of the face)
            boxes = [[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r in rects]
            out.append(_detections(boxes, scores))
        return out


def _backend(name: str) -> _Backend:
    if name not in _BACKENDS:
        raise OptionError(f"Invalid face detector ({name}). Supported values are {', '.join(DETECTORS)}.")
    return _BACKENDS[name]


def _import(name: str):
    """The detector's package, or `FaceDetectorUnavailable` naming it and the install command."""
    b = _backend(name)
    try:
        return importlib.import_module(b.module)
    except ImportError as e:
        raise FaceDetectorUnavailable(f"face detector {name!r} needs the package {b.package!r}, which does not "
                                      f"import ({e}); install it with `{b.install}`") from e


def make_detector(name: str = "mtcnn", *, device: str | torch.device = "cpu", min_face: int = 16,
                  threshold: float | None = None) -> FaceDetector:
    """Build a detector once (weights loaded here); call its ``detect`` on as many batches as needed.

    Args:
        name: one of `DETECTORS`.
        device: auto, cpu, cuda or cuda:N (see `arena.runtime.resolve_device`); ``dlib-hog`` always runs on the CPU.
        min_face: smallest face side, in pixels of the images given to ``detect``, the detector looks for. Smaller
            is slower: MTCNN's image pyramid starts at ``12 / min_face`` scale, dlib upsamples the frame
            ``ceil(log2(80 / min_face))`` times.
        threshold: score a face must reach; None keeps the detector's default (MTCNN: O-net probability 0.7,
            dlib: SVM margin 0.0).

    Raises:
        OptionError: unknown name or device, ``min_face`` < 1, an MTCNN threshold outside (0, 1).
        FaceDetectorUnavailable: the detector's package is not installed.
    """
    _backend(name)
    if int(min_face) != min_face or min_face < 1:
        raise OptionError(f"Invalid min_face ({min_face}). It must be a whole number of pixels >= 1.")
    if name == "mtcnn" and threshold is not None and not 0 < threshold < 1:
        raise OptionError(f"Invalid threshold ({threshold}) for mtcnn. It is a probability: 0 < threshold < 1.")
    dev = resolve_device(device)
    module = _import(name)
    if name == "mtcnn":
        return MtcnnDetector(module, device=dev, min_face=int(min_face), threshold=threshold)
    return DlibHogDetector(module, min_face=int(min_face), threshold=threshold)


def detector_info(name: str) -> dict:
    """What a detector needs and whether it is here, without loading it (for `arena doctor` and provenance).

    Returns:
        ``{"name", "package", "version", "licence", "available", "note"}``; ``version`` is None and ``note``
        gives the install command when the package is not installed.
    """
    b = _backend(name)
    try:
        version = importlib.metadata.version(b.package)
    except importlib.metadata.PackageNotFoundError:
        version = None
    available = version is not None and importlib.util.find_spec(b.module) is not None
    note = b.note if available else f"not installed: {b.install}"
    return {"name": name, "package": b.package, "version": version, "licence": b.licence, "available": available,
            "note": note}
