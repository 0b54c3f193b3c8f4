"""Fault injection over the whole pipeline, through the CLI: kills, a second writer, bad data folders, hostile
videos and checkpoints, impossible options.

Faults already proven elsewhere are not repeated here; README's fault table lists every fault with its test.
Random kill moments come from fixed seeds, so a failure reproduces.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _layout import write_dataset
from _shared import shared_video
from click.testing import CliRunner

from arena.cache import FeatureCache
from arena.cli import main
from arena.limits import MAX_FRAMES, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

FEATURES = ["--frames", "4,6", "--backbone", "test_resnet", "--no-pretrained", "--image-size", "32", "--workers", "0",
            "--device", "cpu", "--frame-batch", "16"]
ROOT = Path(__file__).resolve().parents[1]


def features_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["features", "--data", str(data), "--cache", str(out / "f.h5"), "--models", str(out / "models"),
            *FEATURES, *extra]


@contextlib.contextmanager
def one_thread():
    """In-process runs use one torch thread, like the subprocesses (OMP_NUM_THREADS=1): identical float bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cli(args: list[str]):
    with one_thread():
        return CliRunner().invoke(main, args)


def spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "arena", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, cwd=ROOT)


def wait_for_lock(lock: Path, proc: subprocess.Popen, timeout: float = 180) -> bool:
    """True once ``proc`` holds the cache's write lock (the lock file records the holder's pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            if lock.read_text().strip() == str(proc.pid):
                return True
        time.sleep(0.01)
    return False


def _clip(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """3 real + 3 fake train videos and 2 test videos of 32x32 (12 frames each)."""
    rng = np.random.default_rng(0)
    train = ((f"train/{c}/{c}_{i}.mp4", label, _clip(rng, 12)) for label, c in ((0, "real"), (1, "fake"))
             for i in range(3))
    return write_dataset(tmp_path_factory.mktemp("data"), train, ((f"test/t_{i}.mp4", _clip(rng, 12))
                                                                  for i in range(2)))


ALL_KEYS = sorted([f"train/{c}/{c}_{i}.mp4" for c in ("real", "fake") for i in range(3)] + ["test/t_0.mp4",
                                                                                             "test/t_1.mp4"])


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    """The cache of one uninterrupted `arena features` run."""
    out = tmp_path_factory.mktemp("reference")
    res = cli(features_args(tiny_data, out))
    assert res.exit_code == 0, res.output
    return out / "f.h5"


# ------------------------------------------------------------------------------------------------ interruption


def _staged(out: Path) -> int:
    """Videos the writer has staged so far (one finished part file each)."""
    return len(list((out / "f.h5.parts").glob("*.npz")))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_features_kill9_at_a_random_moment_then_rerun_equals_uninterrupted(tiny_data, reference, tmp_path, seed):
    """kill -9 of the CLI process while it writes; the same command again completes with the same bytes."""
    out = tmp_path / "out"
    rng = random.Random(seed)
    after, delay = rng.randint(0, 6), rng.uniform(0.0, 0.1)  # after this many staged videos, plus a moment
    proc = spawn(features_args(tiny_data, out))
    assert wait_for_lock(out / "f.h5.lock", proc), "the run never took the cache lock"
    while proc.poll() is None and _staged(out) < after:
        time.sleep(0.002)
    time.sleep(delay)
    proc.kill()
    killed = proc.wait() == -signal.SIGKILL
    print(f"seed {seed}: killed={killed} with {_staged(out)} videos staged")
    assert killed, "the run finished before the kill"
    res = cli(features_args(tiny_data, out))
    assert res.exit_code == 0, res.output
    with FeatureCache.open(out / "f.h5") as cache:
        assert sorted(cache.keys) == ALL_KEYS  # every video exactly once
        assert not cache.failures()
    assert filecmp.cmp(out / "f.h5", reference, shallow=False)
    assert not (out / "f.h5.parts").exists()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_rerun_right_after_kill9_is_not_refused_by_the_dead_runs_workers(tiny_data, reference, tmp_path):
    """kill -9 of `arena features` with decode workers alive: the workers shared the lock's file description, so a
    rerun started at once was refused until they noticed their parent was gone. Now it starts and resumes."""
    out = tmp_path / "out"
    proc = spawn(features_args(tiny_data, out, "--workers", "2"))
    workers: list[int] = []
    try:
        assert wait_for_lock(out / "f.h5.lock", proc), "the run never took the cache lock"
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not (workers := _children(proc.pid)):
            time.sleep(0.01)
        assert workers, "the run never started its decode workers"
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
        alive = [w for w in workers if Path(f"/proc/{w}").exists()]
        res = cli(features_args(tiny_data, out))  # at once: the orphaned workers may still be alive
        assert res.exit_code == 0, res.output
        print(f"{len(alive)} of {len(workers)} workers of the killed run were alive at the rerun")
    finally:
        for w in workers:
            with contextlib.suppress(OSError):
                os.kill(w, signal.SIGKILL)
    assert filecmp.cmp(out / "f.h5", reference, shallow=False)


def test_second_features_process_on_the_same_cache_is_refused(tiny_data, reference, tmp_path):
    """Two `arena features` on one cache: the second stops with the lock message; the first finishes intact."""
    out = tmp_path / "out"
    first = spawn(features_args(tiny_data, out))
    try:
        assert wait_for_lock(out / "f.h5.lock", first), "the first run never took the cache lock"
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock for as long as the second run needs
        assert first.poll() is None
        res = cli(features_args(tiny_data, out))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert res.exit_code == 1
    assert f"is being written by another process (pid {first.pid})" in res.output
    assert "--shard" in res.output  # and says what to do instead
    assert first.wait(timeout=300) == 0
    assert filecmp.cmp(out / "f.h5", reference, shallow=False)


# ------------------------------------------------------------------------------------------------ bad input


def _append(rel: str, text: str):
    def mutate(d: Path) -> None:
        with open(d / rel, "a") as f:
            f.write(text)
    return mutate


def _write(rel: str, text: str):
    return lambda d: (d / rel).write_text(text)


def _zero_byte(d: Path) -> None:
    (d / "test/z.mp4").write_bytes(b"")
    _append("test_public.csv", "test/z.mp4\n")(d)


def _text_as_mp4(d: Path) -> None:
    (d / "test/x.mp4").write_text("not a video\n" * 20)
    _append("test_public.csv", "test/x.mp4\n")(d)


def _non_utf8(d: Path) -> None:
    with open(os.path.join(os.fsencode(d / "test"), b"bad\xff.mp4"), "wb") as f:
        f.write((d / "test/t_0.mp4").read_bytes())


def _no_test(d: Path) -> None:
    shutil.rmtree(d / "test")
    (d / "test_public.csv").unlink()


# (case, mutation, exit code of `arena features`, what the output must say)
BAD_INPUT = [
    ("missing-train-csv", lambda d: (d / "train_labels.csv").unlink(), 0,
     "train_labels.csv: missing; labels taken from the train/real and train/fake folders"),
    ("missing-test-csv", lambda d: (d / "test_public.csv").unlink(), 0, "test_public.csv: missing"),
    ("empty-train-csv", _write("train_labels.csv", ""), 1, "train_labels.csv: file is empty"),
    ("empty-test-csv", _write("test_public.csv", ""), 1, "test_public.csv: file is empty"),
    ("wrong-columns", _write("train_labels.csv", "a,b\ntrain/real/real_0.mp4,0\n"), 1,
     "train_labels.csv: no file-name column"),
    ("bad-label", _append("train_labels.csv", "train/real/real_1.mp4,MAYBE\n"), 3,
     "train_labels.csv row 8: label 'MAYBE' for 'train/real/real_1.mp4' is not 0/1/REAL/FAKE; row skipped"),
    ("duplicate-other-label", _append("train_labels.csv", "train/real/real_1.mp4,1\n"), 3,
     "train_labels.csv row 8: train/real/real_1.mp4 already listed in row 3"),
    ("dotdot-name", _append("train_labels.csv", "../../etc/passwd,1\n"), 1,
     "train_labels.csv row 8: file name '../../etc/passwd' is absolute or contains '..'"),
    ("absolute-name", _append("test_public.csv", "/etc/passwd\n"), 1,
     "test_public.csv row 4: file name '/etc/passwd' is absolute or contains '..'"),
    ("listed-but-missing", _append("test_public.csv", "test/nothere.mp4\n"), 3,
     "test_public.csv row 4: 'test/nothere.mp4' listed but not found"),
    ("zero-byte-mp4", _zero_byte, 3, "test/z.mp4: file is empty (0 bytes); skipped"),
    ("text-file-named-mp4", _text_as_mp4, 3, "failed test/x.mp4: cannot decode"),
    ("non-utf8-name", _non_utf8, 3, r"test/bad\xff.mp4: file name is not valid UTF-8; skipped"),
    ("no-test-folder", _no_test, 1, "/test: missing; there is nothing to predict"),
]


@pytest.mark.parametrize("case,mutate,code,message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_data_folder_through_features(tiny_data, tmp_path, case, mutate, code, message):
    """Each problem is named with its file (and row); skippable ones are skipped, reported, and exit 3."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    mutate(data)
    res = cli(features_args(data, tmp_path / "out", "--no-tta", "--frames", "4"))
    assert res.exit_code == code, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    if code == 3:
        with FeatureCache.open(tmp_path / "out" / "f.h5") as cache:  # the usable videos are all there
            assert len(cache.keys) + len(cache.failures()) >= 7


def test_split_without_a_test_folder_works_and_says_so(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    _no_test(data)
    res = CliRunner().invoke(main, ["split", "--data", str(data), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0 and "test: missing; there is nothing to predict (fine for training)" in res.output


def _run_with_watchdog(args: list[str], fifo: Path, seconds: float = 120):
    """Run the CLI in a thread; if it is still running (blocked reading the FIFO), unblock it and fail."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("res", cli(args)), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # a reader exists: give it EOF so the test can end
        os.close(fd)
        thread.join(30)
        pytest.fail(f"{args[0]} opened the FIFO outside the data folder")
    return box["res"]


@pytest.mark.parametrize("command", ["features", "split", "doctor"])
def test_symlink_to_a_file_outside_is_refused_without_opening_it(tiny_data, tmp_path, command):
    """The outside file is a FIFO: anything that opened it for reading would block until a writer comes."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    outside = tmp_path / "outside.mp4"
    os.mkfifo(outside)
    (data / "test/evil.mp4").symlink_to(outside)
    _append("test_public.csv", "test/evil.mp4\n")(data)
    args = {"features": features_args(data, tmp_path / "out", "--no-tta", "--frames", "4"),
            "split": ["split", "--data", str(data), "--out", str(tmp_path / "m")],
            "doctor": ["doctor", "--data", str(data), "--expect", "none", "--backbone", "test_resnet"]}[command]
    if command == "split":  # split needs no test videos; a symlink in train/ matters to it
        (data / "train/real/evil.mp4").symlink_to(outside)
    res = _run_with_watchdog(args, outside)
    assert res.exit_code == 1, res.output
    assert f"is a symlink to {outside.resolve()}, outside the data folder" in res.output
    with pytest.raises(OSError):  # and nobody holds it open for reading now
        os.close(os.open(outside, os.O_WRONLY | os.O_NONBLOCK))


# ------------------------------------------------------------------------------------------------ videos


def _ffmpeg(out: Path, src: str, *args: str) -> Path:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", src, *args, "-c:v", "libx264", "-preset",
                    "ultrafast", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def big_videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("big")
    out = {
        "4k": _ffmpeg(d / "uhd.mp4", "testsrc2=size=3840x2160:rate=10", "-t", "3", "-g", "10", "-pix_fmt", "yuv420p"),
        "portrait": _ffmpeg(d / "portrait.mp4", "testsrc2=size=1080x1920:rate=10", "-t", "3", "-g", "10",
                            "-pix_fmt", "yuv420p"),
    }
    # 4K MPEG-TS cut in the middle of a GOP: torchcodec cannot use it, the sequential FFmpeg fallback decodes it
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(out["4k"]), "-c", "copy", "-f", "mpegts",
                    str(d / "uhd.ts")], check=True)
    data = (d / "uhd.ts").read_bytes()
    out["4k-ts-no-keyframe"] = d / "nokey.ts"
    out["4k-ts-no-keyframe"].write_bytes(data[(len(data) // 188 // 5) * 188:])
    return out


MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    from arena.video import decode_uniform

    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    out = {}
    for path in sys.argv[1:]:
        decode_uniform(path, 2, size=(64, 64))  # libraries and allocator warm
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        base = kib("VmRSS:")
        clip = decode_uniform(path, 24, size=(64, 64))
        out[path] = {"peak_mib": (kib("VmHWM:") - base) / 1024, "shape": list(clip.frames.shape),
                     "decoder": clip.decoder}
    print(json.dumps(out))
""")


def test_4k_and_portrait_decode_to_the_target_size_in_bounded_memory(big_videos):
    """24 frames at 64x64 from 30-frame 4K and 1080x1920 clips; peak RSS far below the full-resolution frames.

    Covers both decode paths: torchcodec (chunks resized as they come) and the sequential FFmpeg fallback (each
    frame resized when read). Before, 24 4K frames peaked at 570 MB and 1390 MB on them.
    """
    paths = [str(big_videos["4k"]), str(big_videos["portrait"]), str(big_videos["4k-ts-no-keyframe"])]
    run = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *paths], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    got = json.loads(run.stdout.strip().splitlines()[-1])
    print(got)
    assert got[paths[2]]["decoder"] == "ffmpeg-sequential"
    for path, (w, h) in zip(paths, [(3840, 2160), (1080, 1920), (3840, 2160)], strict=True):
        assert got[path]["shape"] == [24, 3, 64, 64]
        full = 24 * w * h * 3 / 2**20  # the 24 requested frames materialised at source resolution (RGB)
        # measured: 4K ~200 MiB, portrait ~47 MiB (of 593 and 148 MiB)
        assert got[path]["peak_mib"] < 0.7 * full, (path, got[path], full)


def test_ten_minute_video_decodes_24_frames_spread_over_its_length(tmp_path):
    """10 min at 5 fps (3000 frames): exact mode scans the file once; 24 frames cover its whole length."""
    from arena.video import decode_uniform

    path = _ffmpeg(tmp_path / "long.mp4", "testsrc2=size=64x64:rate=5", "-t", "600", "-g", "50", "-pix_fmt",
                   "yuv420p")
    t0 = time.perf_counter()
    clip = decode_uniform(path, 24, size=(32, 32))
    print(f"10-minute 64x64 video: 24 frames in {time.perf_counter() - t0:.2f} s ({clip.decoder})")
    assert clip.num_source_frames == 3000 and not clip.partial
    assert clip.pts_seconds[0] == 0 and clip.pts_seconds[-1] == pytest.approx(599.8)


def _ffmpeg_rgb_frame0(path: Path, w: int, h: int) -> np.ndarray:
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt",
                          "rgb24", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(h, w, 3)


@pytest.mark.parametrize("kind", ["hevc-main10", "h264-10bit", "h264-444"])
def test_10bit_and_444_decode_like_ffmpeg(tmp_path, kind):
    from arena.video import decode_uniform

    if kind == "hevc-main10":
        path = shared_video("torchcodec_h265_10bits.mp4")
    else:
        fmt = {"h264-10bit": "yuv420p10le", "h264-444": "yuv444p"}[kind]
        path = _ffmpeg(tmp_path / f"{kind}.mp4", "testsrc2=size=96x64:rate=10", "-t", "2", "-pix_fmt", fmt)
    clip = decode_uniform(path, 8)
    assert clip.frames.dtype == torch.uint8 and not clip.partial and clip.valid.all()
    h, w = clip.frames.shape[-2:]
    ref = _ffmpeg_rgb_frame0(path, w, h).astype(np.int16)
    ours = clip.frames[0].permute(1, 2, 0).numpy().astype(np.int16)
    assert np.abs(ours - ref).mean() < 3  # same picture (colour conversion may differ by a level or two)
    small = decode_uniform(path, 8, size=(32, 32))
    assert tuple(small.frames.shape) == (8, 3, 32, 32)


def test_variable_frame_rate_frames_span_the_real_duration():
    from arena.video import decode_uniform, probe

    path = shared_video("torchcodec_var_fps_video.mp4")
    duration = probe(path).duration_seconds
    clip = decode_uniform(path, 24, size=(32, 32))
    assert clip.pts_seconds[-1] - clip.pts_seconds[0] >= 0.8 * duration
    assert np.all(np.diff(clip.pts_seconds) > 0)


# ------------------------------------------------------------------------------------------------ checkpoints


class _RunsCode:
    """Unpickling this calls os.system: a checkpoint that would run code on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil(path: Path, marker: Path, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "arena.head/1", "state_dict": _RunsCode(marker), **extra}, path)
    return path


def test_head_checkpoint_load_refuses_a_pickle_that_runs_code(tmp_path):
    from arena.errors import ModelsError
    from arena.models_folder import HeadCheckpoint

    marker = tmp_path / "pwned"
    with pytest.raises(ModelsError, match="weights_only=True"):
        HeadCheckpoint.load(_evil(tmp_path / "best_head.pt", marker))
    assert not marker.exists()


def test_submit_refuses_a_pickle_that_runs_code(tiny_data, tmp_path):
    marker = tmp_path / "pwned"
    _evil(tmp_path / "models" / "best_head.pt", marker)
    out = tmp_path / "sub" / "PREDICTIONS.CSV"
    res = cli(["submit", "--data", str(tiny_data), "--models", str(tmp_path / "models"), "--out", str(out),
               "--workers", "0", "--device", "cpu"])
    assert res.exit_code == 1 and "weights_only=True" in res.output and "best_head.pt" in res.output
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("where", ["resume", "tuned-head"])
def test_train_full_refuses_a_pickle_that_runs_code(tiny_data, tmp_path, where):
    marker = tmp_path / "pwned"
    models = tmp_path / "models"
    name = "last.pt" if where == "resume" else "best_head.pt"
    _evil(models / name, marker)
    extra = ["--resume", "yes"] if where == "resume" else ["--head-init", "tuned"]
    res = cli(["train-full", "--data", str(tiny_data), "--models", str(models), "--backbone", "test_resnet",
               "--no-pretrained", "--image-size", "32", "--frames", "4", "--epochs", "1", "--workers", "0",
               "--device", "cpu", *extra])
    assert res.exit_code == 1, res.output
    assert name in res.output and ("weights_only" in res.output or "cannot be loaded" in res.output)
    assert not marker.exists()


@pytest.mark.parametrize("change,named", [(["--seed", "4"], "weights_hash"), (["--frames", "4,8"], "frame_counts"),
                                          (["--image-size", "48"], "input_size")],
                         ids=["other-seed", "other-frames", "other-image-size"])
def test_features_refuses_a_cache_of_another_configuration(tiny_data, reference, tmp_path, change, named):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(reference, out / "f.h5")
    args = features_args(tiny_data, out, "--seed", "3")
    for flag, value in zip(change[::2], change[1::2], strict=True):
        args[args.index(flag) + 1] = value
    res = cli(args)
    assert res.exit_code == 1 and named in res.output and str(out / "f.h5") in res.output, res.output
    assert filecmp.cmp(out / "f.h5", reference, shallow=False)  # untouched


# ------------------------------------------------------------------------------------------------ options


BAD_DEVICE = "Invalid device (tpu). Supported values are auto, cpu, cuda or cuda:N."
FRAMES_RANGE = f"0 is not in the range 1<=x<={MAX_FRAMES}"
IRV2_SIZES = f"use 75..{MAX_IMAGE_SIZE} px"
# The same option is refused the same way by every command (one range, one device rule).
OPTIONS = [
    (["features", "--frames", "0"], 2, f"1..{MAX_FRAMES}"),
    (["features", "--image-size", "8"], 2, f"{MIN_IMAGE_SIZE}<=x<={MAX_IMAGE_SIZE}"),
    (["features", "--image-size", "40", "--backbone", "inception_resnet_v2.tf_in1k"], 1, IRV2_SIZES),
    (["features", "--device", "tpu"], 2, BAD_DEVICE),
    (["tune-head", "--n-trials", "-3"], 2, "-3 is not in the range x>=1"),
    (["tune-head", "--frames", "0"], 2, f"1..{MAX_FRAMES}"),
    (["tune-head", "--device", "tpu"], 2, BAD_DEVICE),
    (["train-full", "--frames", "0"], 2, FRAMES_RANGE),
    (["train-full", "--image-size", "40", "--backbone", "inception_resnet_v2.tf_in1k"], 1, IRV2_SIZES),
    (["train-full", "--device", "tpu"], 2, BAD_DEVICE),
    (["submit", "--frames", "0"], 2, FRAMES_RANGE),
    (["submit", "--device", "tpu"], 2, BAD_DEVICE),
]


@pytest.mark.parametrize("args,code,message", OPTIONS, ids=[" ".join(a[:2]) + " " + a[2] for a, _, _ in OPTIONS])
def test_impossible_options_are_refused_with_the_allowed_range(tiny_data, tmp_path, args, code, message):
    command, *rest = args
    common = {"features": ["--data", str(tiny_data), "--cache", str(tmp_path / "f.h5"), "--models",
                           str(tmp_path / "m"), "--no-pretrained", "--workers", "0"],
              "tune-head": ["--data", str(tiny_data), "--cache", str(tmp_path / "f.h5"), "--models", str(tmp_path)],
              "train-full": ["--data", str(tiny_data), "--models", str(tmp_path / "m"), "--no-pretrained",
                             "--workers", "0"],
              "submit": ["--data", str(tiny_data), "--models", str(tmp_path / "m"), "--workers", "0"]}[command]
    res = cli([command, *common, *rest])
    assert res.exit_code == code, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("command", ["tune-head", "features"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_cache_through_the_cli_names_the_file_and_the_rebuild(tiny_data, reference, tmp_path, command,
                                                                      damage):
    bad = tmp_path / "f.h5"
    if damage == "garbage":
        bad.write_bytes(os.urandom(4096))
    else:
        bad.write_bytes(reference.read_bytes()[: reference.stat().st_size // 2])
    if command == "features":
        args = features_args(tiny_data, tmp_path)
    else:
        args = [command, "--data", str(tiny_data), "--cache", str(bad), "--models", str(tmp_path), "--device", "cpu"]
    res = cli(args)
    assert res.exit_code == 1, res.output
    assert str(bad) in res.output and "arena features" in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------------------------------ reporting


def test_train_full_reports_a_broken_video_and_exits_3(tiny_data, tmp_path):
    """Outputs complete, one video skipped: the summary names it with the reason and the exit status is 3."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "train/fake/fake_x.mp4").write_text("not a video\n" * 20)
    _append("train_labels.csv", "train/fake/fake_x.mp4,1\n")(data)
    res = cli(["train-full", "--data", str(data), "--models", str(tmp_path / "m"), "--backbone", "test_resnet",
               "--no-pretrained", "--image-size", "32", "--frames", "4", "--epochs", "1", "--workers", "0",
               "--accum-steps", "1", "--device", "cpu"])
    assert res.exit_code == 3, res.output
    assert "train/fake/fake_x.mp4" in res.output and "not a readable media file" in res.output
    assert (tmp_path / "m" / "test_resnet_best.pt").exists()
