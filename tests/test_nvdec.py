"""The optional NVDEC decoder (`arena.nvdec`) on a CPU machine: PyNvVideoCodec replaced by a fake module.

The fake answers with torchcodec's CPU frames, so the NVDEC path must return exactly the CPU path's indices and
pixels; each way the fake misbehaves must send the file to the CPU decoder with a note. The real decoder's
pixels are measured against the CPU path by ``tools/gpu_check.py`` on a GPU machine.
"""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _shared import shared_video, shared_videos
from torchcodec.decoders import VideoDecoder

from arena import nvdec, video
from arena.errors import OptionError

FACE = "faces/real_aniportrait_may_pose_ref.mp4"  # H.264, 8-bit 4:2:0, 512x512, 125 frames


class _Frame:
    """A decoded frame as PyNvVideoCodec hands it over: DLPack and a timestamp."""

    def __init__(self, data: torch.Tensor, timestamp: int) -> None:
        self.data, self.timestamp = data, timestamp

    def __dlpack__(self, *args, **kwargs):
        return self.data.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.data.__dlpack_device__()


def _fake_module(*, refuse: bool = False, count_offset: int = 0, drop: bool = False, backwards: bool = False,
                 interleaved: bool = False) -> types.ModuleType:
    """A stand-in for PyNvVideoCodec whose SimpleDecoder decodes with torchcodec on the CPU."""
    mod = types.ModuleType(nvdec.PACKAGE)
    mod.OutputColorType = SimpleNamespace(NATIVE="NATIVE", RGB="RGB", RGBP="RGBP")
    mod.opened = []
    mod.batches = []

    class SimpleDecoder:
        def __init__(self, path, gpu_id=0, use_device_memory=True, output_color_type="NATIVE", **kwargs):
            if refuse:
                raise RuntimeError("CUVID: codec not supported")
            assert output_color_type == "RGBP" and use_device_memory
            self._dec = VideoDecoder(path, seek_mode="exact")
            mod.opened.append((path, gpu_id))

        def __len__(self):
            return int(self._dec.metadata.num_frames) + count_offset

        def get_batch_frames_by_index(self, indices):
            mod.batches.append(list(indices))
            batch = self._dec.get_frames_at(list(indices))
            stamps = [int(round(p * 1000)) for p in batch.pts_seconds.tolist()]
            if backwards:
                stamps = stamps[::-1]
            data = batch.data.permute(0, 2, 3, 1) if interleaved else batch.data
            frames = [_Frame(d.contiguous(), s) for d, s in zip(data, stamps, strict=True)]
            return frames[:-1] if drop else frames

    mod.SimpleDecoder = SimpleDecoder
    return mod


@pytest.fixture
def gpu_world(monkeypatch):
    """A machine where CUDA is visible and PyNvVideoCodec imports (the fake); ``install(**behaviour)`` swaps it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def install(**behaviour) -> types.ModuleType:
        mod = _fake_module(**behaviour)
        monkeypatch.setitem(sys.modules, nvdec.PACKAGE, mod)
        nvdec._load.cache_clear()
        return mod

    yield install
    nvdec._load.cache_clear()


@pytest.fixture
def face():
    return shared_videos() / FACE


# --- selection ------------------------------------------------------------------------------------------------------


def test_names_are_checked():
    assert nvdec.check_decoder("auto") == "auto"
    with pytest.raises(OptionError, match=r"Invalid decoder \(gpu\). Supported values are auto, cpu, nvdec"):
        nvdec.check_decoder("gpu")
    with pytest.raises(OptionError, match="Invalid decoder"):
        nvdec.use_nvdec("gpu")
    assert nvdec.gpu_index("cuda:3") == 3 and nvdec.gpu_index("cuda") == 0 and nvdec.gpu_index("cpu") == 0


def test_selection_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert nvdec.use_nvdec("cpu") is False and nvdec.use_nvdec("auto") is False
    with pytest.raises(OptionError, match="--decoder nvdec cannot be used: no CUDA GPU is visible to torch. Use "
                                          "--decoder auto"):
        nvdec.use_nvdec("nvdec")


def test_selection_with_cuda_but_without_the_package(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, nvdec.PACKAGE, None)  # import PyNvVideoCodec raises ImportError
    nvdec._load.cache_clear()
    try:
        assert nvdec.use_nvdec("auto") is False
        with pytest.raises(OptionError, match=r"PyNvVideoCodec does not import \(ModuleNotFoundError.*pip install "
                                              r"'arena\[gpu\]'"):
            nvdec.use_nvdec("nvdec")
    finally:
        nvdec._load.cache_clear()


def test_selection_with_cuda_and_the_package(gpu_world):
    gpu_world()
    assert nvdec.use_nvdec("auto") is True and nvdec.use_nvdec("nvdec") is True and nvdec.use_nvdec("cpu") is False


def test_forcing_nvdec_without_cuda_is_a_clear_error(face, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OptionError, match="--decoder nvdec cannot be used: no CUDA GPU"):
        video.decode_uniform(face, 4, decoder="nvdec")
    assert video.decode_uniform(face, 4, decoder="auto").decoder.startswith("torchcodec")  # auto: quietly the CPU


def test_the_cli_option_refuses_nvdec_without_cuda(monkeypatch):
    import click
    from click.testing import CliRunner

    from arena.cli._options import decoder_option

    @click.command()
    @decoder_option()
    def cmd(decoder):
        click.echo(f"decoder={decoder}")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runner = CliRunner()
    assert runner.invoke(cmd, []).output.strip() == "decoder=cpu"
    res = runner.invoke(cmd, ["--decoder", "nvdec"])
    assert res.exit_code == 2 and "no CUDA GPU is visible" in res.output
    assert runner.invoke(cmd, ["--decoder", "auto"]).exit_code == 0


# --- decoding -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
def test_nvdec_returns_the_cpu_paths_indices_and_pixels(gpu_world, face, interleaved):
    mod = gpu_world(interleaved=interleaved)
    for k, size in ((8, (96, 128)), (200, None)):  # 200 > 125 frames: repeated rows, masked like the CPU path
        ours = video.decode_uniform(face, k, size=size, decoder="nvdec", device="cuda:1")
        ref = video.decode_uniform(face, k, size=size)
        assert ours.decoder.startswith("nvdec") and ref.decoder.startswith("torchcodec")
        np.testing.assert_array_equal(ours.frame_indices, ref.frame_indices)
        np.testing.assert_array_equal(ours.valid, ref.valid)
        assert ours.num_source_frames == ref.num_source_frames and ours.partial == ref.partial
        assert torch.equal(ours.frames, ref.frames)
        np.testing.assert_allclose(ours.pts_seconds, ref.pts_seconds, atol=1e-6)  # constant frame rate
        assert ours.message == ref.message
    assert mod.opened[0][1] == 1  # on the GPU --device names
    assert all(len(b) <= nvdec.CHUNK and b == sorted(set(b)) for b in mod.batches)  # ascending chunks, no repeats


def test_the_union_of_frame_counts_like_the_cache_asks(gpu_world, face):
    gpu_world()

    def select(n):
        return np.unique(np.concatenate([np.linspace(0, n - 1, k).round().astype(np.int64) for k in (4, 6)]))

    ours = video.decode_selected(face, select, size=(64, 64), decoder="auto")
    ref = video.decode_selected(face, select, size=(64, 64), decoder="cpu")
    assert ours.decoder.startswith("nvdec")
    np.testing.assert_array_equal(ours.frame_indices, ref.frame_indices)
    assert torch.equal(ours.frames, ref.frames)


@pytest.mark.parametrize(("behaviour", "note"), [
    ({"refuse": True}, "PyNvVideoCodec cannot open the file (CUVID: codec not supported)"),
    ({"count_offset": -2}, "NVDEC counts 123 frames where the exact scan counts 125"),
    ({"drop": True}, "NVDEC returned 7 of the 8 frames asked for"),
    ({"backwards": True}, "timestamps that do not increase"),
])
def test_a_file_nvdec_cannot_do_goes_to_the_cpu_with_a_note(gpu_world, face, behaviour, note):
    gpu_world(**behaviour)
    ours = video.decode_uniform(face, 8, size=(64, 64), decoder="auto")
    ref = video.decode_uniform(face, 8, size=(64, 64))
    assert ours.decoder == ref.decoder and ours.message.startswith("NVDEC not used (") and note in ours.message
    assert ours.message.endswith("); decoded on the CPU")
    np.testing.assert_array_equal(ours.frame_indices, ref.frame_indices)
    assert torch.equal(ours.frames, ref.frames)


@pytest.mark.parametrize(("name", "note"), [
    ("decord_video_90.mov", "rotated by -90 degrees"),
    ("torchcodec_h265_10bits.mp4", "pixel format yuv420p10le"),
    ("torchcodec_var_fps_video.mp4", "pixel format yuv444p"),
])
def test_streams_nvdec_is_not_used_for(gpu_world, name, note):
    mod = gpu_world()
    path = shared_video(name)
    ours = video.decode_uniform(path, 3, decoder="nvdec")
    ref = video.decode_uniform(path, 3)
    assert note in ours.message and not mod.opened  # never handed to NVDEC
    np.testing.assert_array_equal(ours.frame_indices, ref.frame_indices)
    assert torch.equal(ours.frames, ref.frames)


def test_frames_over_the_pixel_budget_are_brought_within_it(gpu_world, face, monkeypatch):
    gpu_world()
    monkeypatch.setattr(video, "FRAME_PIXEL_BUDGET", 256 * 256)
    clip = video.decode_uniform(face, 4, decoder="nvdec")
    assert clip.decoder.startswith("nvdec") and clip.frames.shape == (4, 3, 256, 256)
    assert "512x512 frames exceed the pixel budget; decoded at 256x256" in clip.message
    assert video.decode_uniform(face, 4, size=(32, 48), decoder="nvdec").frames.shape == (4, 3, 32, 48)


def test_the_clip_pipeline_passes_the_decoder_on(gpu_world, face):
    from arena.clips import ClipDataset, start_method

    gpu_world()
    item = SimpleNamespace(key="faces/x.mp4", path=face, label=1)
    ours = ClipDataset([item], size=(48, 48), frames=5, decoder="nvdec")
    ref = ClipDataset([item], size=(48, 48), frames=5)
    assert torch.equal(ours[0].views, ref[0].views) and ours[0].message == ""
    assert start_method(ours) == "spawn"  # CUDA in workers
    assert start_method(ref) is None
    with pytest.raises(OptionError, match="Invalid decoder"):
        ClipDataset([item], size=(48, 48), frames=5, decoder="gpu")


# --- tools/gpu_check.py: the one table of a GPU run -----------------------------------------------------------------


def _gpu_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_prints_every_row_and_why_one_failed(tmp_path):
    gc = _gpu_check()
    args = gc.parse_args(["--out", str(tmp_path), "--tiny", "--device", "cpu"])
    assert args.backbone == "resnet18" and args.steps.split(",") == list(gc.STEPS)
    with pytest.raises(SystemExit):
        gc.parse_args(["--out", str(tmp_path), "--steps", "data,warp"])
    views = {v: {"max": int(v == "shift_scale_rotate"), "mean": 0.0} for v in ("original", "shift_scale_rotate")}
    rows = {"bare": {"frames_per_s": 3000.0},
            "cpu_albumentations": {"frames_per_s": 1500.0, "over_bare": 0.5, "frames_per_video": 450.0},
            "cpu_tensor_views": {"frames_per_s": 2900.0, "over_bare": 0.97, "frames_per_video": 450.0,
                                 "views_vs_albumentations": views},
            "nvdec_tensor_views": {"error": "exit 1: OptionError: --decoder nvdec cannot be used: no CUDA GPU"}}
    result = {"gpu": "NVIDIA H200", "torch": "2.14.1", "cpus": 16, "wall_s": 400.0, "steps": {
        "pipeline": {"ok": True, "rows": rows},
        "decode": {"ok": True, "cpu": {"median_s_per_video": 0.2}, "nvdec": {"error": "no NVDEC"}},
        "train": {"ok": False, "error": "RuntimeError('exit timeout: TIMEOUT after 150 s')"},
        "submit": {"ok": True, "seconds_for_200_videos": 19.6}}}
    table = gc.format_table(result)
    assert table.startswith("arena gpu_check: NVIDIA H200")
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "| 2900 | bare 3000 | 0.97 | >= 0.9 x bare | yes |" in lines["pipeline, CPU decode + tensor views on the "
                                                                        "GPU, frames/s"]
    assert "**no**" in lines["pipeline, CPU decode + albumentations views (workers), frames/s"]
    assert "FAILED: exit 1: OptionError: --decoder nvdec" in lines["pipeline, NVDEC decode + tensor views on the "
                                                                   "GPU, frames/s"]
    assert "1 / 0.00000" in lines["tensor views on the GPU vs albumentations, max / mean levels"]
    assert "| 124 |" in lines["features, 800 videos x 5 views x union{24,32,48} (projected from the best row), s"]
    assert "FAILED: no NVDEC" in lines["decode 24 frames -> 299^2, NVDEC s/video"]
    assert "FAILED: RuntimeError('exit timeout" in lines["train-full step (299^2, 24 frames, batch 1)"]
    assert "| 19.6 |" in lines["submit, 200 videos x 24 frames x 5 views, s"]
    assert "not run" in lines["arena features end to end (cache written)"]
    (tmp_path / "partial.json").write_text(json.dumps(result))
    assert gc.main(["--out", str(tmp_path), "--table-from", str(tmp_path / "partial.json")]) == 0
    assert (tmp_path / "table.md").read_text() == table
