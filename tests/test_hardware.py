"""GPU guard and OOM fallback, driven by injected sensors (no GPU needed)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from arena.errors import ArenaError, OptionError, OutOfMemoryAfterFallback, ThermalTimeout
from arena.hardware import (
    GpuGuard,
    halving_schedule,
    hardware_summary,
    is_oom,
    run_with_oom_fallback,
)


class FakeSensor:
    """Returns the given readings one by one, then repeats the last."""

    def __init__(self, values):
        self.values = list(values)
        self.reads = 0

    def __call__(self):
        value = self.values[min(self.reads, len(self.values) - 1)]
        self.reads += 1
        return value


def make_guard(temps=(60.0,), mem=(1, 100), **kw):
    messages, sleeps, empties = [], [], []
    clock = iter(range(1000))
    guard = GpuGuard(
        read_temp=FakeSensor(temps), read_mem=lambda: mem, sleep=sleeps.append, clock=lambda: float(next(clock)),
        empty_cache=lambda: empties.append(1), log=messages.append, poll_seconds=2.0, **kw,
    )
    return guard, messages, sleeps, empties


def test_thermal_guard_pauses_at_78_and_resumes_at_72():
    # 77 does not pause; 78 does; 75 and 73 keep it paused (hysteresis); 72 resumes.
    guard, messages, sleeps, _ = make_guard(temps=[77.0, 78.0, 75.0, 73.0, 72.0, 50.0])
    guard.check()
    assert guard.pauses == [] and sleeps == []
    guard.check()
    assert len(guard.pauses) == 1
    pause = guard.pauses[0]
    assert (pause.start_temp_c, pause.end_temp_c) == (78.0, 72.0)
    assert sleeps == [2.0, 2.0, 2.0]
    assert pause.seconds > 0
    assert any("78" in m and "pausing" in m for m in messages)
    assert any("resuming" in m and "72" in m for m in messages)
    guard.check()  # 50 °C: no new pause
    assert len(guard.pauses) == 1
    assert guard.summary()["pauses"] == 1


def test_thermal_thresholds_are_options():
    guard, _, sleeps, _ = make_guard(temps=[70.0, 66.0, 64.0], temp_pause_c=70, temp_resume_c=65)
    guard.check()
    assert len(guard.pauses) == 1 and guard.pauses[0].end_temp_c == 64.0 and len(sleeps) == 2


def test_unreadable_sensor_while_paused_resumes():
    guard, messages, _, _ = make_guard(temps=[80.0, None])
    guard.check()
    assert guard.pauses[0].end_temp_c is None
    assert any("unreadable" in m for m in messages)


def test_bad_thresholds_are_refused():
    with pytest.raises(OptionError, match="must be below temp_pause_c"):
        GpuGuard(temp_pause_c=70, temp_resume_c=75, read_temp=lambda: 0.0)
    with pytest.raises(OptionError, match="vram_warn_frac"):
        GpuGuard(vram_warn_frac=1.5, read_temp=lambda: 0.0)


def test_vram_warning_at_90_percent_empties_cache():
    guard, messages, _, empties = make_guard(mem=(89, 100))
    guard.check()
    assert guard.vram_warnings == 0 and empties == []
    guard, messages, _, empties = make_guard(mem=(90, 100))
    guard.check()
    assert guard.vram_warnings == 1 and len(empties) == 1
    assert any("90%" in m and "emptying the CUDA cache" in m for m in messages)


def test_empty_cache_after_each_video_only_when_asked():
    guard, _, _, empties = make_guard()
    guard.after_video()
    assert empties == []
    guard, _, _, empties = make_guard(empty_cache_each_video=True)
    guard.after_video()
    guard.after_video()
    assert len(empties) == 2


def test_without_nvml_the_guard_is_a_noop_that_says_so_once():
    messages = []
    guard = GpuGuard(log=messages.append, sleep=lambda s: pytest.fail("must not sleep"))
    if guard.active:
        pytest.skip("NVML is available on this machine")
    for _ in range(3):
        guard.check()
    assert len(messages) == 1 and "GPU guard off" in messages[0]


def test_is_oom_recognises_cuda_and_cpu_errors():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert is_oom(RuntimeError("not enough memory: you tried to allocate 123 bytes"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))  # only RuntimeErrors carry allocator messages


def test_halving_schedule():
    assert halving_schedule(24) == [24, 12, 6, 4]
    assert halving_schedule(32, minimum=8) == [32, 16, 8]
    assert halving_schedule(3) == [3]
    with pytest.raises(ValueError, match="start and minimum"):
        halving_schedule(0)


def test_injected_oom_is_survived_with_fewer_frames():
    calls, ooms, messages = [], [], []

    def step(frames: int) -> str:
        calls.append(frames)
        if frames > 6:
            # A real allocation failure on CPU looks like this.
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 99 GB")
        return f"ok@{frames}"

    result, used = run_with_oom_fallback(
        step, halving_schedule(24), log=messages.append, on_oom=lambda size, exc: ooms.append(size)
    )
    assert (result, used) == ("ok@6", 6)
    assert calls == [24, 12, 6] and ooms == [24, 12]
    assert len(messages) == 2 and "retrying with frames=12" in messages[0]


def test_oom_fallback_gives_up_with_a_clear_error_and_passes_other_errors():
    def always_oom(n):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(OutOfMemoryAfterFallback, match=r"even with frames=4 \(tried \[8, 4\]\)"):
        run_with_oom_fallback(always_oom, [8, 4], log=lambda m: None)

    def broken(n):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_oom_fallback(broken, [8, 4])


def test_hardware_summary_is_json():
    info = hardware_summary()
    json.dumps(info)
    assert info["torch"] == torch.__version__
    assert info["cuda_device_count"] == len(info["devices"])


def test_a_pause_longer_than_the_max_wait_raises_thermal_timeout():
    # make_guard's clock ticks one second per reading: still 85 °C after 5 s of pause -> stop, naming the option.
    guard, messages, sleeps, _ = make_guard(temps=[85.0], max_wait_s=5)
    with pytest.raises(ThermalTimeout, match=r"still at 85 °C after a thermal pause of 5 s \(pause at 78 °C, resume "
                                             r"at 72 °C, --thermal-max-wait 5 s\).*none waits without limit"):
        guard.check()
    assert len(sleeps) == 4 and len(guard.pauses) == 1 and guard.pauses[0].seconds == 5
    assert ThermalTimeout.exit_status == 75 and issubclass(ThermalTimeout, ArenaError)
    # 0: stop at once, without sleeping; None: no limit (cools after 50 polls).
    guard, _, sleeps, _ = make_guard(temps=[80.0], max_wait_s=0)
    with pytest.raises(ThermalTimeout, match="after a thermal pause of 1 s"):  # the fake clock's one tick
        guard.check()
    assert sleeps == []
    guard, _, sleeps, _ = make_guard(temps=[80.0] * 51 + [70.0], max_wait_s=None)
    guard.check()
    assert len(sleeps) == 51 and guard.pauses[0].end_temp_c == 70.0
    with pytest.raises(OptionError, match=r"--thermal-max-wait\) must be >= 0 seconds, or none"):
        GpuGuard(max_wait_s=-1, read_temp=lambda: 0.0)


class ThreadRanks:
    """`reduce_max` for guards in threads: each call waits for every thread's values, like an all_reduce MAX."""

    def __init__(self, n: int):
        self.values: list = [None] * n
        self.barrier = threading.Barrier(n, timeout=10)
        self.calls = [0] * n

    def reduce_max(self, rank: int):
        def reduce(values):
            self.calls[rank] += 1
            self.values[rank] = list(values)
            self.barrier.wait()
            out = [max(column) for column in zip(*self.values, strict=True)]
            self.barrier.wait()
            return out

        return reduce


def run_ranks(guards, body):
    """`body(rank, guard)` in one thread per guard; returns what each returned or raised."""
    out = [None] * len(guards)

    def target(rank):
        try:
            out[rank] = body(rank, guards[rank])
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            out[rank] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in range(len(guards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return out


def ranked_guards(temps_per_rank, **kw):
    ranks = ThreadRanks(len(temps_per_rank))
    guards = []
    for rank, temps in enumerate(temps_per_rank):
        guard, _, _, _ = make_guard(temps=temps, **kw)
        guard.reduce_max = ranks.reduce_max(rank)
        guards.append(guard)
    return guards, ranks


def test_ranks_pause_together_until_every_card_has_cooled():
    # Only rank 1 is hot (and cools slowly); rank 0 pauses with it, for the same number of polls.
    guards, ranks = ranked_guards([[40.0], [85.0, 80.0, 75.0, 70.0, 40.0]])
    assert run_ranks(guards, lambda r, g: g.check()) == [False, False]
    assert [len(g.pauses) for g in guards] == [1, 1]
    assert [g.pauses[0].end_temp_c for g in guards] == [40.0, 70.0]
    assert ranks.calls[0] == ranks.calls[1] == 1 + 4  # the check's meeting point, then one per poll


def test_an_out_of_memory_on_one_rank_is_every_ranks_retry():
    guards, ranks = ranked_guards([[40.0], [40.0]])
    assert run_ranks(guards, lambda r, g: g.check(oom=r == 1)) == [True, True]
    assert ranks.calls == [1, 1] and not any(g.pauses for g in guards)


def test_one_ranks_timeout_stops_every_rank():
    guards, _ = ranked_guards([[40.0], [90.0]], max_wait_s=3)
    out = run_ranks(guards, lambda r, g: g.check())
    assert all(isinstance(e, ThermalTimeout) and "still at 90 °C" in str(e) for e in out), out
