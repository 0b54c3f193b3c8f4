"""Helpers shared by several test files: the shared real-world videos and placeholder data folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: Where the shared real-world videos are looked for when ARENA_SHARED_VIDEOS is not set: next to the repository.
DEFAULT_SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"


def _missing(message: str) -> None:
    """Skip the test, or fail it on CI (``CI=true``), where skipping would let every real-world test pass unseen."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def shared_videos() -> Path:
    """The folder of shared real-world videos: ``$ARENA_SHARED_VIDEOS``, else ``<repository>/../shared/videos``.

    When it is missing the test is skipped, naming the path; on CI (``CI=true``) it fails instead, so a CI job
    cannot pass by skipping every real-world test.
    """
    root = Path(os.environ.get("ARENA_SHARED_VIDEOS") or DEFAULT_SHARED_VIDEOS)
    if not root.is_dir():
        _missing(f"shared videos folder {root} not found (set ARENA_SHARED_VIDEOS to its path)")
    return root


def shared_video_files() -> list[Path]:
    """The video files directly in `shared_videos` (sub-folders such as ``faces/`` and MANIFEST.tsv left out)."""
    return sorted(p for p in shared_videos().iterdir() if p.is_file() and p.suffix.lower() != ".tsv")


def shared_video(name: str) -> Path:
    """One file of `shared_videos`; skips (fails on CI) when it is not there."""
    path = shared_videos() / name
    if not path.is_file():
        _missing(f"{path} not found in the shared videos")
    return path


def make_layout(root: Path, n_real: int = 3, n_fake: int = 3, n_test: int = 2, *, csv: str | None = "default",
                test_csv: bool = True) -> Path:
    """Seed layout with placeholder files; ``csv`` None -> no train_labels.csv, a string -> its exact text.

    The data layer never decodes videos, so one-byte files stand in for them.
    """
    for sub in ("train/real", "train/fake", "test"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_real):
        (root / f"train/real/r{i:03d}.mp4").write_bytes(b"\x00")
    for i in range(n_fake):
        (root / f"train/fake/f{i:03d}.mp4").write_bytes(b"\x00")
    for i in range(n_test):
        (root / f"test/t{i:03d}.mp4").write_bytes(b"\x00")
    if csv == "default":
        rows = [f"r{i:03d}.mp4,0" for i in range(n_real)] + [f"f{i:03d}.mp4,1" for i in range(n_fake)]
        csv = "filename,label\n" + "\n".join(rows) + "\n"
    if csv is not None:
        (root / "train_labels.csv").write_text(csv, encoding="utf-8")
    if test_csv:
        (root / "test_public.csv").write_text("filename\n" + "".join(f"t{i:03d}.mp4\n" for i in range(n_test)))
    return root
