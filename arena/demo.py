"""Synthetic demo dataset and a small video writer used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import csv
import json
import math
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
import torch.nn.functional as F
from tqdm.auto import tqdm

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


@dataclass(frozen=True)
class ClipParams:
    """Everything that defines one clip; ``render_clip(params, fake=...)`` is a pure function of it.

    The fake manipulation parameters are drawn for every clip (real ones too) so that a real clip and the fake
    rendered from the same params are identical outside the blend region.
    """

    seed: int                        # texture/noise seed (the arrays are regenerated from it)
    size: tuple[int, int]            # (height, width)
    num_frames: int
    # camera
    zoom0: float                     # output px per canvas px at t=0 (>1 magnifies the grain)
    zoom_rate: float                 # relative zoom change over the clip
    pan: tuple[float, float]         # (dy, dx) over the clip, in frame fractions
    wobble: float                    # hand-held shake amplitude, px
    # lighting and sensor
    light_amp: float
    light_period: float              # in clips
    light_phase: float
    tint: tuple[float, float, float]  # slow per-channel drift amplitude
    sensor_noise: float
    grain_amp: float                 # amplitude of the 1-2 px grain the blend's resampling wipes out
    # manipulation (used when fake=True)
    mask_center: tuple[float, float]  # (y, x) frame fractions
    mask_radii: tuple[float, float]  # (ry, rx) frame fractions
    mask_angle: float
    mask_harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) for k = 2, 3, 4
    mask_blur: float                 # gaussian sigma as a fraction of the mean radius
    mask_drift: float                # px, slow drift amplitude of the mask
    mask_flicker: float              # relative per-frame radius jitter
    blend_alpha: float               # peak opacity of the blended copy
    down_factor: float               # resampling: down to this fraction, then back up
    color_shift: tuple[float, float, float]
    warp_shift: tuple[float, float]  # px
    warp_scale: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def draw_clip_params(rng: np.random.Generator, *, size: tuple[int, int], num_frames: int,
                     difficulty: float = 0.1) -> ClipParams:
    """Draw the parameters of one clip; the only source of randomness besides ``ClipParams.seed``."""
    d = float(difficulty)
    u = rng.uniform
    return ClipParams(
        seed=int(rng.integers(0, 2**31 - 1)),
        size=(int(size[0]), int(size[1])),
        num_frames=int(num_frames),
        zoom0=float(u(1.0, 1.3)),
        zoom_rate=float(u(-0.12, 0.12)),
        pan=(float(u(-0.15, 0.15)), float(u(-0.2, 0.2))),
        wobble=float(u(0.0, 1.0)),
        light_amp=float(u(0.02, 0.10)),
        light_period=float(u(0.8, 3.0)),
        light_phase=float(u(0, 2 * np.pi)),
        tint=tuple(float(v) for v in u(-0.03, 0.03, 3)),
        sensor_noise=float(u(0.006, 0.02)),
        # A narrow grain range: with 0.04-0.10 the scene-to-scene spread of high-frequency energy hid the loss of
        # grain inside the blend from a random-init backbone (frozen-probe AUC 0.66 -> 0.83 with the changes below).
        grain_amp=float(u(0.06, 0.08)),
        mask_center=(float(u(0.35, 0.65)), float(u(0.35, 0.65))),
        # Face-sized regions: in face-centred competition clips a swapped face covers a third of the frame.
        mask_radii=(float(u(0.28, 0.38)), float(u(0.25, 0.34))),
        mask_angle=float(u(-0.4, 0.4)),
        mask_harmonics=tuple((float(u(0.0, 0.08)), float(u(0, 2 * np.pi))) for _ in range(3)),
        mask_blur=float(u(0.08, 0.25)),
        mask_drift=float(u(0.3, 1.5)),
        mask_flicker=float(u(0.005, 0.025)),
        blend_alpha=float(u(0.9, 1.0) * (1.0 - 0.5 * d)),
        down_factor=float(u(0.22, 0.32) + 0.35 * d),
        color_shift=tuple(float(v) for v in u(-1, 1, 3) * (0.05 - 0.03 * d)),
        warp_shift=(float(u(-1.5, 1.5)), float(u(-1.5, 1.5))),
        warp_scale=float(u(0.97, 1.03)),
    )


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur of ``[N, C, H, W]`` (zero padding: a mask is zero outside the frame anyway)."""
    if sigma <= 0:
        return x
    k = _gaussian_kernel(sigma)
    r = (k.numel() - 1) // 2
    c = x.shape[1]
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)


def _upsample(g: torch.Generator, cells: tuple[int, int], shape: tuple[int, int], channels: int) -> torch.Tensor:
    noise = torch.randn((1, channels, *cells), generator=g)
    return F.interpolate(noise, size=shape, mode="bicubic", align_corners=False)[0]


def _make_canvas(params: ClipParams, shape: tuple[int, int]) -> torch.Tensor:
    """A static scene ``[3, Hc, Wc]`` in 0..1: multi-scale texture, hard-edged shapes, fine grain."""
    g = torch.Generator().manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    hc, wc = shape
    # Smooth multi-scale background: each octave mixes a luminance field into colour with its own direction.
    base = torch.tensor(rng.uniform(0.25, 0.7, 3), dtype=torch.float32).view(3, 1, 1)
    img = base.expand(3, hc, wc).clone()
    for octave, cells in enumerate((3, 6, 12, 24, 48)):
        field = _upsample(g, (max(2, cells * hc // max(hc, wc)), max(2, cells * wc // max(hc, wc))), shape, 1)
        color = torch.tensor(rng.uniform(0.4, 1.0, 3), dtype=torch.float32).view(3, 1, 1)
        img = img + field * color * (0.12 / (1.5**octave))
    yy, xx = torch.meshgrid(torch.arange(hc, dtype=torch.float32), torch.arange(wc, dtype=torch.float32), indexing="ij")
    # Hard-edged shapes (no anti-aliasing: crisp boundaries and corners are part of the natural statistics the
    # blend must disturb), each with its own shading and sometimes a fine stripe pattern.
    scale = float(min(hc, wc))
    for _ in range(int(rng.integers(6, 14))):
        kind = rng.integers(0, 3)
        cy, cx = rng.uniform(0, hc), rng.uniform(0, wc)
        ry, rx = rng.uniform(0.04, 0.22, 2) * scale
        ang = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        v = dy * math.cos(ang) + dx * math.sin(ang)
        h = -dy * math.sin(ang) + dx * math.cos(ang)
        if kind == 0:
            inside = (v / ry) ** 2 + (h / rx) ** 2 <= 1.0
        elif kind == 1:
            inside = (v.abs() <= ry) & (h.abs() <= rx)
        else:  # triangle: three half-planes
            inside = torch.ones_like(v, dtype=torch.bool)
            for k in range(3):
                a = ang + 2 * np.pi * k / 3
                inside &= (dy * math.cos(a) + dx * math.sin(a)) <= ry * 0.6
        color = torch.tensor(rng.uniform(0.05, 0.95, 3), dtype=torch.float32).view(3, 1, 1)
        shade = 1.0 + 0.15 * (v / (ry + 1e-6)).clamp(-1, 1) * rng.uniform(-1, 1)
        fill = color * shade
        if rng.random() < 0.4:
            period = rng.uniform(2.5, 6.0)
            fill = fill * (1.0 + rng.uniform(0.05, 0.15) * torch.sin(2 * np.pi * h / period))
        img = torch.where(inside, fill, img)
    # Fine grain, 1-2 px: white noise lightly blurred, mostly luminance with a little chroma.
    amp = params.grain_amp
    sigma = float(rng.uniform(0.4, 0.8))
    grain = _blur(torch.randn((1, 1, hc, wc), generator=g), sigma)[0]
    grain = grain / grain.std()
    chroma = _blur(torch.randn((1, 3, hc, wc), generator=g), sigma)[0]
    chroma = chroma / chroma.std()
    img = img + amp * (grain + 0.3 * chroma)
    return img.clamp(0.0, 1.0)


def _camera_grids(params: ClipParams, canvas_shape: tuple[int, int]) -> torch.Tensor:
    """Sampling grids ``[T, H, W, 2]`` for ``grid_sample``: a slow pan and zoom plus a small shake."""
    h, w = params.size
    hc, wc = canvas_shape
    t = torch.linspace(0.0, 1.0, params.num_frames)
    zoom = params.zoom0 * (1.0 + params.zoom_rate * t)
    rng = np.random.default_rng(params.seed + 1)
    shake = torch.tensor(rng.normal(0.0, params.wobble, (params.num_frames, 2)), dtype=torch.float32)
    cy = hc / 2 + (t - 0.5) * params.pan[0] * h + shake[:, 0]
    cx = wc / 2 + (t - 0.5) * params.pan[1] * w + shake[:, 1]
    ys = torch.arange(h, dtype=torch.float32) - (h - 1) / 2
    xs = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
    py = cy.view(-1, 1, 1) + ys.view(1, -1, 1) / zoom.view(-1, 1, 1)  # canvas pixel coordinates
    px = cx.view(-1, 1, 1) + xs.view(1, 1, -1) / zoom.view(-1, 1, 1)
    gy = (2 * py + 1) / hc - 1  # align_corners=False convention
    gx = (2 * px + 1) / wc - 1
    return torch.stack((gx.expand(-1, h, w), gy.expand(-1, h, w)), dim=-1)


def blend_masks(params: ClipParams) -> torch.Tensor:
    """Soft blend masks ``[T, H, W]`` in 0..1 (exactly 0 outside the support): a jittered, blurred ellipse that
    drifts and flickers a little from frame to frame."""
    h, w = params.size
    n = params.num_frames
    rng = np.random.default_rng(params.seed + 2)
    t = np.linspace(0.0, 1.0, n)
    phase = rng.uniform(0, 2 * np.pi, 4)
    drift_y = params.mask_drift * np.sin(2 * np.pi * t + phase[0]) + rng.normal(0, 0.25, n)
    drift_x = params.mask_drift * np.sin(2 * np.pi * 0.7 * t + phase[1]) + rng.normal(0, 0.25, n)
    flicker = 1.0 + params.mask_flicker * rng.standard_normal(n)
    cy = torch.tensor(params.mask_center[0] * h + drift_y, dtype=torch.float32).view(-1, 1, 1)
    cx = torch.tensor(params.mask_center[1] * w + drift_x, dtype=torch.float32).view(-1, 1, 1)
    ys = torch.arange(h, dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, -1)
    dy, dx = ys - cy, xs - cx
    a = params.mask_angle
    v = dy * math.cos(a) + dx * math.sin(a)
    u = -dy * math.sin(a) + dx * math.cos(a)
    ry, rx = params.mask_radii[0] * h, params.mask_radii[1] * w
    theta = torch.atan2(v / ry, u / rx)
    boundary = torch.ones_like(theta)
    for k, (amp, ph) in enumerate(params.mask_harmonics, start=2):
        boundary = boundary + amp * torch.cos(k * theta + ph)
    boundary = boundary * torch.tensor(flicker, dtype=torch.float32).view(-1, 1, 1)
    hard = (((v / ry) ** 2 + (u / rx) ** 2).sqrt() <= boundary).float()
    sigma = params.mask_blur * 0.5 * (ry + rx)
    soft = _blur(hard.unsqueeze(1), sigma)[:, 0]
    soft = soft / soft.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    soft = torch.where(soft < 1e-3, torch.zeros_like(soft), soft)  # a finite support, so "outside" is exact
    return soft * params.blend_alpha


def _manipulated_copy(frames: torch.Tensor, params: ClipParams) -> torch.Tensor:
    """The SBI source: colour-shifted, down- then up-resampled (wipes the grain), slightly shifted and scaled."""
    t, _, h, w = frames.shape
    shift = torch.tensor(params.color_shift, dtype=torch.float32).view(1, 3, 1, 1)
    src = frames + shift
    small = (max(8, int(round(h * params.down_factor))), max(8, int(round(w * params.down_factor))))
    src = F.interpolate(src, size=small, mode="bilinear", align_corners=False, antialias=True)
    src = F.interpolate(src, size=(h, w), mode="bilinear", align_corners=False)
    s = params.warp_scale
    theta = torch.tensor([[1 / s, 0.0, -2 * params.warp_shift[1] / w], [0.0, 1 / s, -2 * params.warp_shift[0] / h]],
                         dtype=torch.float32)
    grid = F.affine_grid(theta.expand(t, 2, 3), [t, 3, h, w], align_corners=False)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)


def render_clip(params: ClipParams, *, fake: bool = False, return_mask: bool = False
                ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Render one clip as uint8 ``[T, H, W, 3]`` RGB.

    The real and the fake rendering of the same ``params`` are identical wherever the blend mask is 0; with
    ``return_mask=True`` the masks ``float32 [T, H, W]`` come back too (zeros for a real clip's blend, but the
    mask that *would* be used is returned either way, so tests can compare both renderings).
    """
    h, w = params.size
    canvas_shape = (int(math.ceil(h * 1.5)) + 8, int(math.ceil(w * 1.5)) + 8)
    canvas = _make_canvas(params, canvas_shape)
    grids = _camera_grids(params, canvas_shape)
    frames = F.grid_sample(canvas.unsqueeze(0).expand(params.num_frames, -1, -1, -1), grids, mode="bilinear",
                           padding_mode="reflection", align_corners=False)
    # Slow lighting change: a global gain plus a small per-channel tint drift.
    t = torch.linspace(0.0, 1.0, params.num_frames).view(-1, 1, 1, 1)
    gain = 1.0 + params.light_amp * torch.sin(2 * np.pi * t / params.light_period + params.light_phase)
    tint = torch.tensor(params.tint, dtype=torch.float32).view(1, 3, 1, 1) * torch.sin(np.pi * t)
    frames = frames * gain + tint
    # Sensor noise before the manipulation: a real swap replaces the camera's noise in the region as well.
    g = torch.Generator().manual_seed(params.seed + 3)
    frames = frames + params.sensor_noise * torch.randn(frames.shape, generator=g)
    # A real clip never uses the mask (computing it anyway cost ~40 % of a real clip's render time).
    mask = blend_masks(params) if fake or return_mask else None
    if fake:
        src = _manipulated_copy(frames, params)
        m = mask.unsqueeze(1)
        frames = torch.where(m > 0, frames * (1 - m) + src * m, frames)
    out = (frames.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return (out, mask.numpy()) if return_mask else out


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


def _clip_rng(seed: int, group: int, index: int) -> np.random.Generator:
    # One independent stream per (group, index): adding test videos never changes the training videos.
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(group, index)))


def plan_dataset(config: DemoConfig) -> list[_Job]:
    """The list of videos to write (path relative to OUT, label, parameters); a pure function of ``config``."""
    gop = config.gop or max(1, int(round(config.fps)))
    common = dict(size=config.size, num_frames=config.num_frames, difficulty=config.difficulty)
    jobs: list[_Job] = []
    for i in range(config.n_train_real):
        p = draw_clip_params(_clip_rng(config.seed, 0, i), **common)
        jobs.append(_Job(f"train/real/real_{i + 1:04d}.mp4", 0, p, config.fps, config.crf, gop))
    for i in range(config.n_train_fake):
        paired = config.paired and i < config.n_train_real
        p = draw_clip_params(_clip_rng(config.seed, 0 if paired else 1, i), **common)
        jobs.append(_Job(f"train/fake/fake_{i + 1:04d}.mp4", 1, p, config.fps, config.crf, gop))
    n_fake = config.n_test // 2
    labels = np.array([0] * (config.n_test - n_fake) + [1] * n_fake)
    labels = _clip_rng(config.seed, 3, 0).permutation(labels)  # names carry no label
    seen = {0: 0, 1: 0}
    for i, label in enumerate(labels):
        # paired: the j-th fake reuses the scene of the j-th real; otherwise every video has a scene of its own
        scene = seen[int(label)] if config.paired else i
        seen[int(label)] += 1
        p = draw_clip_params(_clip_rng(config.seed, 2, scene), **common)
        jobs.append(_Job(f"test/test_{i + 1:04d}.mp4", int(label), p, config.fps, config.crf, gop))
    return jobs


def _write_job(job: _Job, out: str) -> tuple[str, int]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per worker: the pool provides the parallelism, and results stay exact
    try:
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
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a synthetic deepfake dataset in the competition layout.

    Layout written into ``out`` (every filename in the CSVs is the POSIX path relative to ``out``)::

        train_labels.csv   filename,label   (train/real/real_0001.mp4,0 / train/fake/fake_0001.mp4,1; 1 = fake)
        test_public.csv    filename         (test/test_0001.mp4 ...; names and order do not reveal the label)
        test_labels.csv    filename,label   (the test answers: for scoring only)
        demo_manifest.json the config and every clip's parameters (provenance)
        train/real/*.mp4, train/fake/*.mp4, test/*.mp4

    Options left ``None`` come from ``preset`` (default ``"demo"``). ``size`` is ``(height, width)``. See
    ``DemoConfig`` for the meaning of each option (``paired``: fakes share scenes with reals).

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
                                    difficulty=difficulty, crf=crf, paired=paired)
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
    _write_csv(out / "train_labels.csv", ["filename", "label"], [(j.relpath, j.label) for j in train])
    _write_csv(out / "test_public.csv", ["filename"], [(j.relpath,) for j in test])
    _write_csv(out / "test_labels.csv", ["filename", "label"], [(j.relpath, j.label) for j in test])
    manifest = {
        "generator": "arena.demo.generate_dataset",
        "config": asdict(config),
        "clips": [{"filename": j.relpath, "label": j.label, "params": j.params.to_dict()} for j in jobs],
    }
    (out / "demo_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(sizes.values())
    return {
        "out": str(out),
        "n_train_real": config.n_train_real,
        "n_train_fake": config.n_train_fake,
        "n_test": config.n_test,
        "n_test_fake": sum(j.label for j in test),
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
