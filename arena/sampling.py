"""Which frames of a video are used: the one definition shared by the decoder, the cache, training and submission."""

from __future__ import annotations

import operator
from collections.abc import Iterable

import numpy as np

DEFAULT_FRAMES = 24  # frames per video when nothing (an option, frame_test.json) says otherwise
FRAME_CHOICES = (24, 32, 48)  # the frame counts the specification compares


def uniform_indices(num_frames: int, k: int) -> np.ndarray:
    """The seed's frame sampling: ``np.linspace(0, n - 1, k).astype(int64)`` (duplicates when ``k > n``)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return np.linspace(0, num_frames - 1, k).astype(np.int64)


def union_indices(num_source_frames: int, frame_counts: Iterable[int]) -> np.ndarray:
    """Sorted union of ``uniform_indices(n, k)`` over ``frame_counts``: the frames to decode once per video.

    Args:
        num_source_frames: n, the number of frames the video yields (>= 1).
        frame_counts: the k values the cache must serve, e.g. (24, 32, 48).
    """
    n = operator.index(num_source_frames)
    counts = [operator.index(k) for k in frame_counts]
    if n < 1:
        raise ValueError(f"num_source_frames must be >= 1, got {n}")
    if not counts or min(counts) < 1:
        raise ValueError(f"frame_counts must be a non-empty list of positive ints, got {list(frame_counts)}")
    return np.unique(np.concatenate([uniform_indices(n, k) for k in counts])).astype(np.int64)


def sampling_spec() -> dict[str, str]:
    """How frame indices are chosen, as stored in the cache provenance (a change here changes the features)."""
    return {"rule": "uniform", "formula": "np.linspace(0, n - 1, k).astype(int64)", "union": "sorted unique over k"}


def first_occurrence(indices) -> np.ndarray:
    """True at the first occurrence of each frame index (in row order), False for repeats: the attention mask of a
    sample that asked for more frames than the video has (``uniform_indices(5, 8)`` repeats frames)."""
    idx = np.asarray(indices)
    first = np.zeros(len(idx), dtype=bool)
    _, pos = np.unique(idx, return_index=True)
    first[pos] = True
    return first
