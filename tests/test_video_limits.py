"""Bounded memory whatever the input (issue 17, item 3): the pixel budget per decoded frame, the refusal above
16K UHD, and a hang guard with a ceiling."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from arena import _ffmpeg
from arena.errors import VideoDecodeError
from arena.limits import FRAME_PIXEL_BUDGET, MAX_STREAM_PIXELS
from arena.video import budget_size, decode_uniform

ROOT = Path(__file__).resolve().parents[1]
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI to make the inputs")


def _encode(path: Path, width: int, height: int, frames: int = 2) -> Path:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate=5",
                    "-frames:v", str(frames), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                    str(path)], check=True, timeout=300)
    return path


@pytest.fixture(scope="module")
def big_inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("big")
    return {"8k": _encode(d / "8k.mp4", 8192, 8192), "16k_wide": _encode(d / "16k_wide.mp4", 16384, 2048)}


def test_budget_size_keeps_aspect_and_refuses_beyond_16k():
    assert budget_size("x.mp4", 3840, 2160) is None  # 4K UHD untouched
    assert budget_size("x.mp4", 4096, 4096) is None
    h, w = budget_size("x.mp4", 8192, 8192)
    assert (h, w) == (4096, 4096)
    h, w = budget_size("x.mp4", 16384, 2048)
    assert h * w <= FRAME_PIXEL_BUDGET and h % 2 == 0 and w % 2 == 0 and abs(w / h - 8) < 0.01
    assert budget_size("x.mp4", 15360, 8640) is not None  # 16K UHD: decoded, within the budget
    with pytest.raises(VideoDecodeError, match=r"x\.mp4.*16384x16384 frames .*exceed the 133 Mpx limit"):
        budget_size("x.mp4", 16384, 16384)
    assert MAX_STREAM_PIXELS == 15360 * 8640


@needs_ffmpeg
@pytest.mark.parametrize("name", ["8k", "16k_wide"])
def test_oversized_streams_are_decoded_within_the_budget(big_inputs, name):
    clip = decode_uniform(big_inputs[name], 4)
    h, w = clip.frames.shape[-2:]
    assert h * w <= FRAME_PIXEL_BUDGET
    assert (clip.info.width, clip.info.height) == {"8k": (8192, 8192), "16k_wide": (16384, 2048)}[name]
    assert "exceed the pixel budget" in clip.message
    small = decode_uniform(big_inputs[name], 4, size=(64, 64))  # the model-input path too
    assert tuple(small.frames.shape) == (4, 3, 64, 64) and small.frames.float().std() > 10


_PEAK = """
import json, resource, sys
from arena.video import decode_uniform
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
clip = decode_uniform(sys.argv[1], 24)
print(json.dumps({"delta_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
                  "shape": list(clip.frames.shape)}))
"""


@needs_ffmpeg
def test_peak_memory_of_24_frames_of_an_8k_stream_is_bounded(big_inputs):
    """24 rows of an 8192x8192 clip: 4.8 GB of frames at full size (11.5 GB peak measured before the budget)."""
    out = subprocess.run([sys.executable, "-c", _PEAK, str(big_inputs["8k"])], capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=600)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"8192x8192, 24 rows: +{got['delta_mb']:.0f} MB over the imports, frames {got['shape']}")
    assert got["shape"] == [24, 3, 4096, 4096]
    assert got["delta_mb"] < 2500


def test_ffmpeg_hang_guard_has_a_ceiling(tmp_path):
    small, large = tmp_path / "s.bin", tmp_path / "l.bin"
    small.write_bytes(b"\0" * 1000)
    with open(large, "wb") as f:  # sparse: 5 GB of size, no disk
        f.truncate(5 * 10**9)
    assert _ffmpeg._timeout_for(small) == pytest.approx(30.02)
    assert _ffmpeg._timeout_for(large) == _ffmpeg.MAX_FFMPEG_SECONDS == 600.0
