"""Decoder tests on videos whose frame number is drawn into the pixels, on FFmpeg-made edge cases and on the
shared real-world files."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _shared import shared_video, shared_video_files

from arena import video
from arena.demo import write_video
from arena.errors import OptionError
from arena.sampling import first_occurrence, uniform_indices

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI")

H, W, BITS = 48, 72, 9  # 9 stripes of 8 px: indices up to 511


def numbered_frames(n: int) -> np.ndarray:
    """Frames whose index is written as 9 black/white vertical stripes (robust to H.264 at any sane CRF)."""
    frames = np.full((n, H, W, 3), 16, np.uint8)
    for i in range(n):
        for b in range(BITS):
            if (i >> b) & 1:
                frames[i, :, b * 8:(b + 1) * 8] = 235
    return frames


def read_index(frame: torch.Tensor) -> int:
    """Inverse of `numbered_frames` on a decoded [3, h, w] frame of any size (stripe centres only)."""
    h, w = frame.shape[-2:]
    gray = frame.float().mean(0)
    value = 0
    for b in range(BITS):
        x0, x1 = int((b * 8 + 2) * w / W), int((b * 8 + 6) * w / W)
        if gray[h // 4: 3 * h // 4, x0:max(x1, x0 + 1)].mean() > 128:
            value |= 1 << b
    return value


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-v", "error", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def vids(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    out = {
        "gop5": write_video(d / "gop5.mp4", numbered_frames(60), 30, gop=5),
        "gop250": write_video(d / "gop250.mp4", numbered_frames(300), 30, gop=250),
        "short": write_video(d / "short.mp4", numbered_frames(10), 30, gop=30),
        "one": write_video(d / "one.mp4", numbered_frames(1), 30),
    }
    out["rot"] = d / "rot.mp4"
    try:
        ffmpeg("-display_rotation", "90", "-i", str(out["gop5"]), "-c", "copy", str(out["rot"]))
    except subprocess.CalledProcessError:  # FFmpeg < 6 has no -display_rotation; the rotate tag does the same
        ffmpeg("-i", str(out["gop5"]), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(out["rot"]))
    # a TS segment that starts in the middle of a GOP (cut at a 188-byte packet boundary)
    ts = d / "full.ts"
    ffmpeg("-i", str(out["gop250"]), "-c", "copy", "-f", "mpegts", str(ts))
    data = ts.read_bytes()
    out["nokey"] = d / "nokey.ts"
    out["nokey"].write_bytes(data[(len(data) // 188 // 3) * 188:])
    # truncated MP4 with the moov atom first (a download cut short)
    fs = d / "faststart.mp4"
    ffmpeg("-i", str(out["gop5"]), "-c", "copy", "-movflags", "+faststart", str(fs))
    data = fs.read_bytes()
    out["truncated"] = d / "truncated.mp4"
    out["truncated"].write_bytes(data[: len(data) * 2 // 3])
    # MP4 with an edit list (stream copy starting after a keyframe)
    out["editlist"] = d / "editlist.mp4"
    ffmpeg("-ss", "0.5", "-i", str(out["gop250"]), "-c", "copy", str(out["editlist"]))
    out["zero"] = d / "zero.mp4"
    out["zero"].write_bytes(b"")
    out["text"] = d / "text.mp4"
    out["text"].write_text("this is not a video\n")
    out["audio"] = d / "audio.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=0.5", str(out["audio"]))
    return out


# ------------------------------------------------------------------------------------------------ exactness


def test_uniform_indices_matches_seed():
    assert uniform_indices(300, 24).tolist() == np.linspace(0, 299, 24).astype(int).tolist()
    assert uniform_indices(3, 5).tolist() == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        uniform_indices(0, 4)


@pytest.mark.parametrize("name,n", [("gop5", 60), ("gop250", 300)])
def test_uniform_frames_are_exact(vids, name, n):
    clip = video.decode_uniform(vids[name], 24)
    assert clip.num_source_frames == n == video.source_frame_count(vids[name])
    assert clip.frames.shape == (24, 3, H, W) and clip.frames.dtype == torch.uint8
    assert clip.frame_indices.tolist() == uniform_indices(n, 24).tolist()
    assert [read_index(f) for f in clip.frames] == clip.frame_indices.tolist()
    assert clip.valid.all() and not clip.partial
    np.testing.assert_allclose(clip.pts_seconds, clip.frame_indices / 30, atol=1e-6)


def test_unsorted_duplicate_indices(vids):
    idx = [250, 3, 17, 3, 299]
    clip = video.decode_indices(vids["gop250"], idx)
    assert [read_index(f) for f in clip.frames] == idx
    assert clip.valid.tolist() == [True, True, True, False, True]
    with pytest.raises(ValueError, match="out of range; the video has 300 frames"):
        video.decode_indices(vids["gop250"], [300])


def test_fewer_frames_than_requested(vids):
    clip = video.decode_uniform(vids["short"], 24)
    assert clip.frames.shape[0] == 24 and clip.num_source_frames == 10
    assert [read_index(f) for f in clip.frames] == clip.frame_indices.tolist()
    assert clip.valid.sum() == 10 and clip.partial and "10 distinct frames for 24 rows" in clip.message


def test_single_frame_video(vids):
    clip = video.decode_uniform(vids["one"], 4)
    assert clip.frame_indices.tolist() == [0, 0, 0, 0] and clip.valid.tolist() == [True, False, False, False]
    assert all(torch.equal(f, clip.frames[0]) for f in clip.frames)


def test_resize_inside_decode_is_the_one_resize(vids):
    full = video.decode_uniform(vids["gop5"], 6)
    small = video.decode_uniform(vids["gop5"], 6, size=(24, 36))
    assert small.frames.shape == (6, 3, 24, 36)
    assert torch.equal(small.frames, video.resize_frames(full.frames, (24, 36)))
    assert [read_index(f) for f in small.frames] == small.frame_indices.tolist()
    dec = video.decode_uniform(vids["gop5"], 6, size=(24, 36), resize="decoder")
    assert dec.frames.shape == small.frames.shape
    assert (dec.frames.int() - small.frames.int()).abs().float().mean() < 4  # same geometry, other kernel


def test_rotation_is_applied(vids):
    info = video.probe(vids["rot"])
    assert abs(info.rotation) == 90 and (info.width, info.height) == (H, W)
    clip = video.decode_uniform(vids["rot"], 3)
    assert clip.frames.shape[-2:] == (W, H)


# ------------------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("name,reason", [
    ("zero", "empty file"), ("text", "not a readable media file"), ("audio", "no video stream"),
])
def test_undecodable_files_raise_typed_error(vids, name, reason):
    with pytest.raises(video.VideoDecodeError, match=reason) as err:
        video.decode_uniform(vids[name], 8)
    assert err.value.path == str(vids[name]) and str(vids[name]) in str(err.value)
    with pytest.raises(video.VideoDecodeError, match=reason):
        video.source_frame_count(vids[name])


def test_missing_file():
    with pytest.raises(video.VideoDecodeError, match="does not exist"):
        video.probe("/nonexistent/x.mp4")


def test_truncated_file_gives_partial_frames(vids):
    clip = video.decode_uniform(vids["truncated"], 16, size=(24, 36))
    assert clip.frames.shape == (16, 3, 24, 36)
    real = clip.valid
    assert real.any() and clip.partial and clip.message
    assert [read_index(f) for f in clip.frames[torch.from_numpy(real)]] == clip.frame_indices[real].tolist()


def test_ts_without_keyframe_decodes_sequentially(vids):
    clip = video.decode_uniform(vids["nokey"], 12)
    got = [read_index(f) for f in clip.frames]
    assert clip.decoder == "ffmpeg-sequential" and "first frame" in clip.message
    assert np.all(np.diff(got) > 0) and got[-1] == 299  # consecutive decodable frames, in order, to the end
    assert got[-1] - got[0] == clip.num_source_frames - 1
    assert video.probe(vids["nokey"]).num_frames == clip.num_source_frames == video.source_frame_count(vids["nokey"])


def test_edit_list_is_exact(vids):
    clip = video.decode_uniform(vids["editlist"], 10)
    got = [read_index(f) for f in clip.frames]
    assert got == [got[0] + int(i) for i in clip.frame_indices]
    assert got[-1] == 299


@pytest.mark.parametrize("name", ["gop250", "truncated", "nokey", "short"])
def test_union_rows_equal_subset_decodes(vids, name):
    """The cache decodes the union of uniform indices for several k and reads subsets back."""
    path = vids[name]
    n = video.source_frame_count(path)
    subsets = {k: uniform_indices(n, k) for k in (24, 32, 48)}
    union = np.unique(np.concatenate(list(subsets.values())))
    whole = video.decode_indices(path, union, size=(24, 36))
    assert whole.num_source_frames == n
    for k, idx in subsets.items():
        sub = video.decode_uniform(path, k, size=(24, 36))
        assert sub.num_source_frames == n and sub.frame_indices.tolist() == idx.tolist()
        pos = np.searchsorted(union, idx)
        assert torch.equal(whole.frames[torch.from_numpy(pos)], sub.frames), k
        np.testing.assert_array_equal(whole.pts_seconds[pos], sub.pts_seconds)
        np.testing.assert_array_equal(whole.valid[pos] & first_occurrence(idx), sub.valid)


def test_shared_real_world_videos():
    files = shared_video_files()
    assert len(files) >= 10, files  # MANIFEST.tsv lists ten; sub-folders (faces/) are not videos
    for path in files:
        try:
            clip = video.decode_uniform(path, 8, size=(32, 32))
        except video.VideoDecodeError as e:
            assert str(path) in str(e) and e.reason
            continue
        assert clip.frames.shape == (8, 3, 32, 32), path
        assert clip.valid[0] and clip.num_source_frames >= 1
        if clip.valid.all():
            assert np.all(np.diff(clip.pts_seconds) > 0), path


def test_shared_corrupted_h264_gives_frames():
    path = shared_video("decord_corrupted.mp4")
    clip = video.decode_uniform(path, 24, size=(32, 32))
    assert clip.decoder == "ffmpeg-sequential" and "Could not push packet" in clip.message
    assert clip.valid.sum() >= 23


def test_variable_frame_rate_indices_are_frames():
    path = shared_video("torchcodec_var_fps_video.mp4")
    clip = video.decode_indices(path, np.arange(0, 300, 10))
    gaps = np.diff(clip.pts_seconds)
    assert np.all(gaps > 0) and gaps.max() > 1.5 * gaps.min()  # frame indices, not evenly spaced times


def test_clip_validates_itself():
    info = video.VideoInfo("x", "mp4", "h264", 4, 4, 30.0, 1, 0.1, 0.0)
    with pytest.raises(ValueError, match="uint8 tensor"):
        video.DecodedClip(torch.zeros(1, 3, 4, 4), np.zeros(1, np.int64), np.zeros(1), np.ones(1, bool), 1, False, info)
    with pytest.raises(ValueError, match="valid must be bool"):
        video.DecodedClip(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), np.zeros(1, np.int64), np.zeros(1),
                          np.ones(2, bool), 1, False, info)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decode_matches_cpu_geometry(vids):
    clip = video.decode_uniform(vids["gop250"], 8, device="cuda")
    assert clip.frames.shape == (8, 3, H, W)
    assert [read_index(f.cpu()) for f in clip.frames] == clip.frame_indices.tolist()


def test_cuda_request_without_gpu_falls_back(vids):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for device in ("cuda", "cuda:0", "auto"):
        clip = video.decode_uniform(vids["gop5"], 4, device=device)
        assert clip.frames.device.type == "cpu"


def test_device_and_options_are_checked(vids):
    for device in ("gpu", "cuda:x", "cpu:0"):
        with pytest.raises(OptionError, match=rf"Invalid device \({device}\).*auto, cpu, cuda or cuda:N"):
            video.decode_uniform(vids["gop5"], 4, device=device)
    with pytest.raises(OptionError, match="Invalid resize"):
        video.decode_uniform(vids["gop5"], 4, resize="magic")
    with pytest.raises(OptionError, match=r"size must be \(height, width\)"):
        video.decode_uniform(vids["gop5"], 4, size=(0, 4))


def test_a_folder_is_not_a_video(tmp_path):
    (tmp_path / "sub.mp4").mkdir()
    with pytest.raises(video.VideoDecodeError, match="not a regular file"):
        video.decode_uniform(tmp_path / "sub.mp4", 4)
    assert video.inspect_videos([tmp_path / "sub.mp4"])[0]["status"] == "error"


# ------------------------------------------------------------------------------------------------------ CLI


def test_inspect_cli(vids):
    from click.testing import CliRunner

    from arena.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["inspect", str(vids["gop5"]), str(vids["zero"]), str(vids["short"]),
                               "--decode", "24", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["status"] for r in rows] == ["ok", "error", "partial"]
    assert rows[0]["num_frames"] == 60 and rows[0]["width"] == W and "empty file" in rows[1]["message"]
    res = runner.invoke(main, ["inspect", str(vids["gop5"]), str(vids["text"])])
    assert res.exit_code == 0 and "gop5.mp4" in res.output and "not a readable media file" in res.output


def test_missing_shared_videos_skip_locally_and_fail_on_ci(tmp_path, monkeypatch):
    import _shared

    monkeypatch.setenv("ARENA_SHARED_VIDEOS", str(tmp_path / "absent"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="absent not found"):
        _shared.shared_videos()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="absent not found"):
        _shared.shared_videos()
    monkeypatch.setenv("ARENA_SHARED_VIDEOS", str(tmp_path))
    assert _shared.shared_videos() == tmp_path
    with pytest.raises(pytest.fail.Exception, match="x.mp4 not found"):
        _shared.shared_video("x.mp4")
