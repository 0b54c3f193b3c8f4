"""Writing small datasets in the competition layout for tests (videos + CSVs), so fixtures only say what is in them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from arena.demo import write_video


def write_dataset(root: Path, train: Iterable[tuple[str, int, np.ndarray]],
                  test: Iterable[tuple[str, np.ndarray]] | None = None, *, fps: float = 10, gop: int = 6) -> Path:
    """Write ``train`` (name, label, frames ``[T, H, W, 3]``) and ``test`` (name, frames) videos and their CSVs.

    The iterables are consumed in order (train first), so frames drawn lazily from one RNG come out the same as
    with a hand-written loop.
    """
    rows = ["filename,label"]
    for name, label, frames in train:
        write_video(root / name, frames, fps=fps, gop=gop)
        rows.append(f"{name},{label}")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    if test is not None:
        names = ["filename"]
        for name, frames in test:
            write_video(root / name, frames, fps=fps, gop=gop)
            names.append(name)
        (root / "test_public.csv").write_text("\n".join(names) + "\n")
    return root
