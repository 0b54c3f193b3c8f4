"""The demo dataset: its configuration and presets, the plan of which clip is which (and which manipulation
family each fake gets), the parallel writer, and the small FFmpeg video writer used by the demo, the tests and the
benchmarks (clips are rendered by `arena.demo_render`)."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from arena.demo_render import ClipParams, SpliceParams, draw_clip_params, draw_splice_params, render_clip, render_splice
from arena.errors import ArenaError, OptionError


class DemoError(ArenaError, RuntimeError):
    """The demo data cannot be written (no ffmpeg, or ffmpeg failed); the message says what to install or check."""


def ffmpeg_binary() -> str:
    """Return the ffmpeg executable, or raise with what to install."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise DemoError("ffmpeg not found on PATH. Install it (Debian/Ubuntu: apt-get install -y ffmpeg).")
    return exe


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float = 25.0,
    *,
    codec: str = "libx264",
    crf: int = 18,
    gop: int = 30,
    pix_fmt: str = "yuv420p",
    extra_args: tuple[str, ...] = (),
) -> Path:
    """Encode RGB frames ``uint8 [T, H, W, 3]`` into a video file with FFmpeg (raw frames piped on stdin).

    Args:
        path: output file; its extension chooses the container.
        frames: uint8 array ``[T, H, W, 3]``; for yuv420p H and W must be even.
        fps: frame rate written into the stream.
        codec: FFmpeg encoder name (``libx264``, ``libx265``, ``mpeg4``...).
        crf: quality for x264/x265 (lower is better).
        gop: keyframe interval in frames (``-g``), which sets how far a seek must decode.
        pix_fmt: output pixel format.
        extra_args: more output options, placed before the file name.
    """
    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    t, h, w, _ = frames.shape
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        ffmpeg_binary(), "-y", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", f"{fps}", "-i", "-",
        "-c:v", codec, "-pix_fmt", pix_fmt, "-g", str(gop),
    ]
    if codec in ("libx264", "libx265"):
        cmd += ["-crf", str(crf), "-preset", "veryfast"]
        if codec == "libx264":
            cmd += ["-bf", "0"] if gop <= 1 else []
        if codec == "libx265":
            cmd += ["-x265-params", "log-level=error"]
    cmd += [*extra_args, str(path)]
    proc = subprocess.run(cmd, input=frames.tobytes(), capture_output=True)
    if proc.returncode != 0:
        raise DemoError(f"ffmpeg could not write {path}: {proc.stderr.decode(errors='replace').strip()}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Synthetic dataset generator.
#
# Why it looks the way it does: no ImageNet weights exist on our machines, so the demo must be learnable by a
# random-init backbone. Measured (GUIDE §4): on smooth procedural textures nothing generalises; with fine grain
# (1-2 px) and hard edges in every scene, the down/up-resampling inside an SBI-style blend region wipes the grain
# and leaves a local boundary, which a random-init InceptionResNetV2 learns. The cue is local on purpose: reals and
# fakes share codec, size, length, fps and (in expectation) colour statistics, so there is no global shortcut.
# ---------------------------------------------------------------------------------------------------------------

Preset = Literal["demo", "competition"]
FakeMethod = Literal["blend", "splice", "mixed"]

#: The manipulation families (`arena.demo_render`): ``blend`` = a self-blended copy of the frame (SBI-style, the
#: default); ``splice`` = another scene's region, generator-upsampled and colour-transferred. ``mixed`` alternates
#: them over the fakes of a set (the first fake ``blend``), so both are present in equal numbers.
FAKE_METHODS = ("blend", "splice")

#: Defaults per preset. "competition" mimics the real dataset (600 train + 200 test, ~700 MB in all).
PRESETS: dict[str, dict[str, Any]] = {
    # 112x112 = the demo backbone input: no resize softens the grain whose loss inside the blend is the cue.
    "demo": dict(n_train_real=100, n_train_fake=100, n_test=40, seconds=2.0, size=(112, 112), fps=15.0, crf=18),
    # crf 26: measured 0.85 MB per 10 s 640x360 clip on average -> ~680 MB for the 800 videos.
    "competition": dict(n_train_real=300, n_train_fake=300, n_test=200, seconds=10.0, size=(360, 640), fps=30.0,
                        crf=26),
}


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one generated dataset; validated on construction.

    Attributes:
        n_train_real: real training videos (``train/real``).
        n_train_fake: fake training videos (``train/fake``).
        n_test: test videos (``test/``), half real and half fake (the extra one real when odd), shuffled.
        seconds: length of every video.
        size: ``(height, width)`` of every video; both even (yuv420p).
        fps: frame rate of every video.
        seed: master seed; every per-video parameter is drawn from it, so a seed reproduces the dataset bit for bit.
        difficulty: 0 (obvious blend) .. 1 (subtle blend). Only changes the fakes' blend strength, resampling
            factor and colour shift, never anything global.
        crf: x264 quality (same for reals and fakes).
        gop: keyframe interval in frames; ``None`` means one keyframe per second.
        paired: each fake is rendered from the same scene as one real (train: fake_i from real_i's scene; test:
            the j-th fake from the j-th real's scene), as SBI derives fakes from reals and as competition sets
            hold several videos of one source. The two differ only inside the blend region, which is what makes
            the local cue learnable from few clips. ``False`` gives every video its own scene.
        fake_method: manipulation family of the training fakes: ``blend``, ``splice`` or ``mixed`` (see
            `FAKE_METHODS`). A ``blend`` fake is byte-for-byte the same whatever the other fakes are.
        test_fake_method: the same for the test fakes; ``None`` = ``fake_method``. ``blend`` for training and
            ``mixed`` for the test gives a held-out family that training never saw.
    """

    n_train_real: int = 100
    n_train_fake: int = 100
    n_test: int = 40
    seconds: float = 2.0
    size: tuple[int, int] = (112, 112)
    fps: float = 15.0
    seed: int = 0
    difficulty: float = 0.1
    crf: int = 18
    gop: int | None = None
    paired: bool = True
    fake_method: FakeMethod = "blend"
    test_fake_method: FakeMethod | None = None

    def __post_init__(self) -> None:
        for name in ("n_train_real", "n_train_fake", "n_test"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise OptionError(f"{name} must be an integer >= 0, got {value!r}.")
        if self.n_train_real + self.n_train_fake + self.n_test == 0:
            raise OptionError("Nothing to generate: n_train_real, n_train_fake and n_test are all 0.")
        h, w = self.size
        if h < 32 or w < 32 or h % 2 or w % 2:
            raise OptionError(f"size must be (height, width), both even and >= 32, got {self.size!r}. Try (128, 128).")
        if not 0 < self.fps <= 120:
            raise OptionError(f"fps must be in (0, 120], got {self.fps!r}.")
        if self.num_frames < 2:
            raise OptionError(f"seconds * fps must give at least 2 frames, got {self.seconds!r} s at {self.fps!r} fps.")
        if not 0.0 <= self.difficulty <= 1.0:
            raise OptionError(f"difficulty must be in [0, 1] (0 obvious, 1 subtle), got {self.difficulty!r}.")
        if not 0 <= self.crf <= 51:
            raise OptionError(f"crf must be in [0, 51], got {self.crf!r}.")
        choices = (*FAKE_METHODS, "mixed")
        for name in ("fake_method", "test_fake_method"):
            value = getattr(self, name)
            if value not in choices and not (value is None and name == "test_fake_method"):
                raise OptionError(f"Unknown {name} {value!r}. Supported values are {', '.join(choices)}.")

    @property
    def num_frames(self) -> int:
        return int(round(self.seconds * self.fps))

    @classmethod
    def from_preset(cls, preset: Preset = "demo", **overrides: Any) -> DemoConfig:
        """Preset defaults, with every non-``None`` override applied."""
        if preset not in PRESETS:
            raise OptionError(f"Unknown preset {preset!r}. Supported values are {', '.join(PRESETS)}.")
        values = dict(PRESETS[preset])
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["size"] = tuple(int(v) for v in values["size"])
        return cls(**values)


# ---------------------------------------------------------------------------------------------------------------
# Dataset writer
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    relpath: str
    label: int
    params: ClipParams
    fps: float
    crf: int
    gop: int
    original: str = ""  # the real whose scene a paired fake was rendered from (its file name), else ""
    method: str = ""  # a fake's manipulation family (one of FAKE_METHODS); "" for a real
    splice: SpliceParams | None = None  # the donor and generator of a splice fake


def _clip_rng(seed: int, group: int, index: int) -> np.random.Generator:
    # One independent stream per (group, index): adding test videos never changes the training videos.
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(group, index)))


def _family(choice: str, ordinal: int) -> str:
    """The family of the ``ordinal``-th fake of a set under ``choice`` (``mixed`` alternates, blend first)."""
    return FAKE_METHODS[ordinal % len(FAKE_METHODS)] if choice == "mixed" else choice


def plan_dataset(config: DemoConfig) -> list[_Job]:
    """The list of videos to write (path relative to OUT, label, parameters); a pure function of ``config``."""
    gop = config.gop or max(1, int(round(config.fps)))
    common = dict(size=config.size, num_frames=config.num_frames, difficulty=config.difficulty)

    def manipulation(choice: str, ordinal: int, group: int) -> dict[str, Any]:
        # Splice donors come from streams of their own (groups 4 and 5), so the scenes of every clip, and every
        # blend fake, are the same whichever family the other fakes get.
        method = _family(choice, ordinal)
        splice = draw_splice_params(_clip_rng(config.seed, group, ordinal), **common) if method == "splice" else None
        return dict(method=method, splice=splice)

    jobs: list[_Job] = []
    for i in range(config.n_train_real):
        p = draw_clip_params(_clip_rng(config.seed, 0, i), **common)
        jobs.append(_Job(f"train/real/real_{i + 1:04d}.mp4", 0, p, config.fps, config.crf, gop))
    for i in range(config.n_train_fake):
        paired = config.paired and i < config.n_train_real
        p = draw_clip_params(_clip_rng(config.seed, 0 if paired else 1, i), **common)
        jobs.append(_Job(f"train/fake/fake_{i + 1:04d}.mp4", 1, p, config.fps, config.crf, gop,
                         original=f"train/real/real_{i + 1:04d}.mp4" if paired else "",
                         **manipulation(config.fake_method, i, 4)))
    n_fake = config.n_test // 2
    labels = np.array([0] * (config.n_test - n_fake) + [1] * n_fake)
    labels = _clip_rng(config.seed, 3, 0).permutation(labels)  # names carry no label
    seen = {0: 0, 1: 0}
    reals = [f"test/test_{i + 1:04d}.mp4" for i, label in enumerate(labels) if label == 0]
    test_choice = config.test_fake_method or config.fake_method
    for i, label in enumerate(labels):
        # paired: the j-th fake reuses the scene of the j-th real; otherwise every video has a scene of its own
        ordinal = seen[int(label)]
        scene = ordinal if config.paired else i
        seen[int(label)] += 1
        p = draw_clip_params(_clip_rng(config.seed, 2, scene), **common)
        original = reals[scene] if config.paired and label == 1 and scene < len(reals) else ""
        fake = manipulation(test_choice, ordinal, 5) if label == 1 else {}
        jobs.append(_Job(f"test/test_{i + 1:04d}.mp4", int(label), p, config.fps, config.crf, gop, original, **fake))
    return jobs


def _write_job(job: _Job, out: str) -> tuple[str, int]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per worker: the pool provides the parallelism, and results stay exact
    try:
        if job.splice is not None:
            frames = render_splice(job.params, job.splice)
        else:
            frames = render_clip(job.params, fake=bool(job.label))
    finally:
        torch.set_num_threads(threads)  # in-process generation must not change the caller's thread count
    path = Path(out) / job.relpath
    # -threads 1 keeps x264's output byte-identical from run to run and machine to machine (same FFmpeg build).
    write_video(path, frames, job.fps, crf=job.crf, gop=job.gop,
                extra_args=("-threads", "1", "-fflags", "+bitexact", "-map_metadata", "-1"))
    return job.relpath, path.stat().st_size


def _write_job_star(args: tuple[_Job, str]) -> tuple[str, int]:
    return _write_job(*args)


def generate_dataset(
    out: str | Path,
    *,
    n_train_real: int | None = None,
    n_train_fake: int | None = None,
    n_test: int | None = None,
    seconds: float | None = None,
    size: tuple[int, int] | None = None,
    fps: float | None = None,
    seed: int = 0,
    difficulty: float = 0.1,
    preset: Preset | None = None,
    crf: int | None = None,
    paired: bool = True,
    fake_method: FakeMethod = "blend",
    test_fake_method: FakeMethod | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a synthetic deepfake dataset in the competition layout.

    Layout written into ``out`` (every filename in the CSVs is the POSIX path relative to ``out``)::

        train_labels.csv   filename,label,original,method   (train/real/real_0001.mp4,0,, / train/fake/fake_0001.mp4,
                           1,train/real/real_0001.mp4,blend; 1 = fake; original: the real whose scene a paired fake
                           keeps; method: a fake's manipulation family, empty for a real)
        test_public.csv    filename         (test/test_0001.mp4 ...; names and order do not reveal the label)
        test_labels.csv    filename,label,original,method   (the test answers, sources and families: scoring only)
        demo_manifest.json the config and every clip's parameters (provenance)
        train/real/*.mp4, train/fake/*.mp4, test/*.mp4

    Options left ``None`` come from ``preset`` (default ``"demo"``). ``size`` is ``(height, width)``. See
    ``DemoConfig`` for the meaning of each option (``paired``: fakes share scenes with reals; ``fake_method`` and
    ``test_fake_method``: the manipulation families of the training and the test fakes).

    Args:
        out: output folder; must be empty or absent unless ``overwrite``.
        workers: processes for rendering and encoding (default: CPU count); 1 runs in this process.
        overwrite: delete an existing non-empty ``out`` first.
        progress: show a tqdm bar.

    Returns:
        A summary dict: counts, total bytes, seconds taken, the resolved config.
    """
    config = DemoConfig.from_preset(preset or "demo", n_train_real=n_train_real, n_train_fake=n_train_fake,
                                    n_test=n_test, seconds=seconds, size=size, fps=fps, seed=seed,
                                    difficulty=difficulty, crf=crf, paired=paired, fake_method=fake_method,
                                    test_fake_method=test_fake_method)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out} exists and is not a folder. Choose another OUT.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OptionError(f"{out} is not empty. Choose an empty folder or pass overwrite=True (--force).")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("train/real", "train/fake", "test"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    jobs = plan_dataset(config)
    start = time.perf_counter()
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    sizes: dict[str, int] = {}
    bar = tqdm(total=len(jobs), desc="demo-data", unit="video", disable=not progress)
    if workers <= 1:
        for job in jobs:
            rel, nbytes = _write_job(job, str(out))
            sizes[rel] = nbytes
            bar.update()
    else:
        # spawn, not fork: forking a process whose torch/OpenMP threads are running can deadlock the children.
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            for rel, nbytes in pool.imap_unordered(_write_job_star, [(job, str(out)) for job in jobs]):
                sizes[rel] = nbytes
                bar.update()
    bar.close()

    train = [j for j in jobs if j.relpath.startswith("train/")]
    test = [j for j in jobs if j.relpath.startswith("test/")]
    # `original` names each paired fake's source (empty for reals and unpaired fakes): `arena split` keeps the
    # two on one side, and near-duplicate detection (`arena.groups`) can be scored against it. `method` lets a
    # benchmark score each manipulation family apart (the layout scan ignores columns it does not know).
    header = ["filename", "label", "original", "method"]
    _write_csv(out / "train_labels.csv", header, [(j.relpath, j.label, j.original, j.method) for j in train])
    _write_csv(out / "test_public.csv", ["filename"], [(j.relpath,) for j in test])
    _write_csv(out / "test_labels.csv", header, [(j.relpath, j.label, j.original, j.method) for j in test])
    manifest = {
        "generator": "arena.demo.generate_dataset",
        "config": asdict(config),
        "clips": [{"filename": j.relpath, "label": j.label, "method": j.method, "params": j.params.to_dict(),
                   **({"splice": j.splice.to_dict()} if j.splice is not None else {})} for j in jobs],
    }
    (out / "demo_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(sizes.values())
    return {
        "out": str(out),
        "n_train_real": config.n_train_real,
        "n_train_fake": config.n_train_fake,
        "n_test": config.n_test,
        "n_test_fake": sum(j.label for j in test),
        "fakes_by_method": {m: sum(j.method == m for j in jobs) for m in FAKE_METHODS},
        "num_frames": config.num_frames,
        "total_bytes": total,
        "seconds_taken": time.perf_counter() - start,
        "workers": workers,
        "config": asdict(config),
    }


def _write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
