"""The one device and precision policy, and the one atomic writer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from arena import runtime
from arena._files import atomic_write, atomic_write_text, remove_stale_temporaries
from arena.errors import ArenaError, OptionError


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_device_names_of_every_command_are_accepted(name):
    assert runtime.check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "cpu:0", "auto:1", "cuda:", "cuda:x", ""])
def test_bad_device_names_are_refused_with_the_choices(name):
    with pytest.raises(OptionError, match=r"Supported values are auto, cpu, cuda or cuda:N"):
        runtime.check_device_name(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_and_auto_is_the_cpu():
    assert runtime.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(OptionError, match="no CUDA GPU is visible"):
        runtime.resolve_device("cuda:1")


def test_precision_policy():
    cpu = torch.device("cpu")
    assert runtime.autocast_dtype(cpu, "fp32") is None
    assert runtime.autocast_dtype(cpu, "off") is None  # train-full's old spelling
    assert runtime.autocast_dtype(cpu, "bf16") == torch.bfloat16
    # auto: bf16 only where the CPU runs it natively (emulated bf16 was 10x slower than fp32 on this project's CPU)
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert runtime.autocast_dtype(cpu, "auto") == (torch.bfloat16 if native else None)
    with pytest.raises(OptionError, match="fp16 needs a CUDA device"):
        runtime.autocast_dtype(cpu, "fp16")
    with pytest.raises(OptionError, match="Invalid precision \\(fp8\\)"):
        runtime.autocast_dtype(cpu, "fp8")
    assert runtime.needs_grad_scaler(torch.float16) and not runtime.needs_grad_scaler(torch.bfloat16)
    assert [runtime.precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]


def test_atomic_write_replaces_whole_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "sub" / "f.csv"
    atomic_write_text(out, "a,b\r\n1,2\r\n")
    assert out.read_bytes() == b"a,b\r\n1,2\r\n"  # newlines as given

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(out, boom)
    assert out.read_bytes() == b"a,b\r\n1,2\r\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["f.csv"]


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "x.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_tmp = tmp_path / f".x.json.{int(dead.stdout)}.abc.tmp"
    live_tmp = tmp_path / f".x.json.{os.getppid()}.abc.tmp"
    dead_tmp.write_text("left by a killed writer")
    live_tmp.write_text("being written")
    assert remove_stale_temporaries(out) == [dead_tmp]
    assert live_tmp.exists()


def test_every_arena_error_derives_from_one_base():
    import arena.errors as errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert len(classes) >= 10
    assert all(issubclass(c, ArenaError) for c in classes)
