"""Hardware safety for long runs: a GPU temperature/VRAM guard (pynvml) and out-of-memory fallbacks.

A 4 GB laptop GPU that trains for hours overheats and runs out of memory; both should slow the run down,
not end it. `GpuGuard.check()` is called between steps: it pauses while the card is too hot and empties
the CUDA cache when VRAM is nearly full. A pause that lasts its maximum wait without the card cooling raises
`ThermalTimeout` (training then stops resumably). On a machine without NVML (CPU only, or no driver) it does
nothing and says so once. The sensor readers are injectable so the tests can drive the guard without a GPU.

Under DDP a rank that pauses (or retries an out-of-memory step) while the others go on leaves them waiting in
the next collective, which times out. So `check()` is the processes' one meeting point of a step: with
`GpuGuard.reduce_max` set (`arena.distributed.all_max`) they share "my card is too hot" and "my step ran out of
memory" in one all_reduce and then all pause, all retry or all stop together.

`is_oom` / `run_with_oom_fallback` turn an out-of-memory error into a retry with a smaller workload
(fewer frames, a smaller batch); training and submission share them.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pynvml
import torch

from arena.errors import ArenaError, OptionError, OutOfMemoryAfterFallback, ThermalTimeout

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Reads the GPU temperature in °C; None when the sensor cannot be read.
TempReader = Callable[[], "float | None"]
#: Reads (used_bytes, total_bytes) of GPU memory; None when it cannot be read.
MemReader = Callable[[], "tuple[int, int] | None"]
#: Element-wise maximum of every process's values (`arena.distributed.all_max`); flags are 0/1.
ReduceMax = Callable[[Sequence[float]], "list[float]"]


# ----------------------------------------------------------------------------------------------------------------
# NVML access


def _nvml_handle(device_index: int) -> Any:
    """Initialise NVML and return the handle of the CUDA device `device_index` (raises when NVML is unusable).

    CUDA and NVML may number devices differently (CUDA_VISIBLE_DEVICES, PCI order), so the device is looked
    up by its UUID when torch can tell it; NVML's own index is the fallback.
    """
    pynvml.nvmlInit()
    if torch.cuda.is_available():
        try:
            uuid = str(torch.cuda.get_device_properties(device_index).uuid)
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except Exception:  # noqa: BLE001 - older drivers / MIG: fall back to the index
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)


def nvml_readers(device_index: int = 0) -> tuple[TempReader, MemReader] | str:
    """Return (temperature reader, memory reader) for a GPU, or a string saying why NVML is unavailable."""
    try:
        handle = _nvml_handle(device_index)
    except Exception as exc:  # noqa: BLE001 - any NVML failure means "no guard", never a crash
        return f"{type(exc).__name__}: {exc}"

    def read_temp() -> float | None:
        try:
            return float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
        except Exception:  # noqa: BLE001
            return None

    def read_mem() -> tuple[int, int] | None:
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return int(info.used), int(info.total)
        except Exception:  # noqa: BLE001
            return None

    return read_temp, read_mem


def empty_cuda_cache() -> None:
    """Free Python garbage and the CUDA caching allocator's unused blocks (no-op without CUDA)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# The guard


@dataclass(frozen=True)
class PauseEvent:
    """One thermal pause: the temperature that triggered it, the one it resumed at, and how long it lasted."""

    start_temp_c: float
    end_temp_c: float | None
    seconds: float


class GpuGuard:
    """Pause on heat, warn and free memory on high VRAM use; a no-op (said once) without NVML.

    Args:
        temp_pause_c: pause when the GPU reaches this temperature (°C).
        temp_resume_c: once paused, resume when the temperature is at or below this (°C).
        vram_warn_frac: warn and empty the CUDA cache when used/total VRAM reaches this fraction.
        empty_cache_each_video: `after_video()` empties the CUDA cache (slower, but keeps a small card's
            fragmentation down).
        poll_seconds: how often the temperature is read while paused.
        max_wait_s: the longest pause (s): a card still above `temp_resume_c` after it raises `ThermalTimeout`;
            0 stops at once, None waits without limit.
        device_index: the CUDA device to watch (the local rank under DDP).
        read_temp / read_mem: sensor readers; default: NVML on `device_index`. Injected readers make the
            guard active even without a GPU (tests).
        sleep / clock / empty_cache: injectable for tests.
        log: where messages go (default: this module's logger at INFO/WARNING).

    Attributes:
        reduce_max: None with one process. Under DDP the run sets it to `arena.distributed.all_max`: every
            `check()` is then one all_reduce of three numbers, and each poll of a pause another.
    """

    def __init__(
        self,
        *,
        temp_pause_c: float = 78.0,
        temp_resume_c: float = 72.0,
        vram_warn_frac: float = 0.9,
        empty_cache_each_video: bool = False,
        poll_seconds: float = 5.0,
        max_wait_s: float | None = 1800.0,
        device_index: int = 0,
        read_temp: TempReader | None = None,
        read_mem: MemReader | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        empty_cache: Callable[[], None] = empty_cuda_cache,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if not temp_resume_c < temp_pause_c:
            raise OptionError(
                f"temp_resume_c (--temp-resume {temp_resume_c}) must be below temp_pause_c (--temp-pause "
                f"{temp_pause_c}); e.g. pause at 78 and resume at 72."
            )
        if not 0.0 < vram_warn_frac <= 1.0:
            raise OptionError(f"vram_warn_frac (--vram-warn) must be in (0, 1], got {vram_warn_frac}; "
                              "e.g. 0.9 for 90 %.")
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}.")
        if max_wait_s is not None and not 0 <= max_wait_s < float("inf"):
            raise OptionError(f"max_wait_s (--thermal-max-wait) must be >= 0 seconds, or none to wait without "
                              f"limit; got {max_wait_s}.")
        self.temp_pause_c = float(temp_pause_c)
        self.temp_resume_c = float(temp_resume_c)
        self.vram_warn_frac = float(vram_warn_frac)
        self.empty_cache_each_video = empty_cache_each_video
        self.poll_seconds = float(poll_seconds)
        self.max_wait_s = None if max_wait_s is None else float(max_wait_s)
        self.reduce_max: ReduceMax | None = None
        self._sleep, self._clock, self._empty_cache = sleep, clock, empty_cache
        self._log = log or logger.warning
        self.pauses: list[PauseEvent] = []
        self.vram_warnings = 0
        self.cache_empties = 0

        self.disabled_reason = ""
        if read_temp is None and read_mem is None:
            readers = nvml_readers(device_index)
            if isinstance(readers, str):
                self.disabled_reason = f"NVML unavailable ({readers})"
                read_temp = read_mem = None
            else:
                read_temp, read_mem = readers
        self._read_temp, self._read_mem = read_temp, read_mem
        self._said_disabled = False

    @property
    def active(self) -> bool:
        """True when at least one sensor is read."""
        return self._read_temp is not None or self._read_mem is not None

    def check(self, *, oom: bool = False) -> bool:
        """Call between steps: pause while too hot, then warn and free memory when VRAM is nearly full.

        Under DDP every process calls it at the same point of the step, saying whether its step ran out of memory
        (`oom`); all of them pause when any card is too hot, until every card has cooled.

        Returns:
            whether any process's step ran out of memory (`oom` itself with one process), so that all retry.

        Raises:
            ThermalTimeout: a pause lasted `max_wait_s` (on every process at once under DDP).
        """
        if not self.active and not self._said_disabled:
            self._log(f"GPU guard off: {self.disabled_reason or 'no sensors'}; no thermal pauses or VRAM checks.")
            self._said_disabled = True
        temp = self._temperature()
        hot = temp is not None and temp >= self.temp_pause_c
        any_hot, any_oom = self._max([hot, oom])
        if any_hot:
            self._pause(temp)
        self._check_memory()
        return bool(any_oom)

    def after_video(self) -> None:
        """Call after each video: empties the CUDA cache when `empty_cache_each_video` was asked for."""
        if self.empty_cache_each_video:
            self._empty_cache()
            self.cache_empties += 1

    def _temperature(self) -> float | None:
        return None if self._read_temp is None else self._read_temp()

    def _max(self, values: list[float]) -> list[float]:
        """Every process's `values`, element-wise maximum (no collective with one process)."""
        return list(values) if self.reduce_max is None else list(self.reduce_max(values))

    def _pause(self, temp: float | None) -> None:
        """Wait until every card is at or below `temp_resume_c` (hysteresis: not just below the pause threshold,
        so the run does not flap around it), or raise `ThermalTimeout` after `max_wait_s`."""
        start_temp, start = temp, self._clock()
        if temp is not None and temp >= self.temp_pause_c:
            self._log(f"GPU at {temp:.0f} °C (pause threshold {self.temp_pause_c:.0f} °C): pausing until it cools to "
                      f"{self.temp_resume_c:.0f} °C.")
        else:
            self._log(f"another process's GPU reached the pause threshold {self.temp_pause_c:.0f} °C (this one: "
                      f"{_celsius(temp)}): pausing with it until every GPU is at or below {self.temp_resume_c:.0f} °C.")
        while True:
            seconds = self._clock() - start
            warm = temp is not None and temp > self.temp_resume_c
            late = warm and self.max_wait_s is not None and seconds >= self.max_wait_s
            any_warm, any_late, hottest = self._max([warm, late, -1.0 if temp is None else temp])
            if not any_warm:
                break
            if any_late:
                self.pauses.append(PauseEvent(start_temp_c=start_temp, end_temp_c=temp, seconds=seconds))
                raise ThermalTimeout(
                    f"the GPU is still at {hottest:.0f} °C after a thermal pause of {seconds:.0f} s (pause at "
                    f"{self.temp_pause_c:.0f} °C, resume at {self.temp_resume_c:.0f} °C, --thermal-max-wait "
                    f"{self.max_wait_s:g} s). Let the machine cool (airflow, a lower power limit) or raise "
                    "--thermal-max-wait (none waits without limit).")
            self._sleep(self.poll_seconds)
            temp = self._temperature()
        seconds = self._clock() - start
        self.pauses.append(PauseEvent(start_temp_c=start_temp, end_temp_c=temp, seconds=seconds))
        if temp is None:
            self._log(f"GPU temperature unreadable after {seconds:.1f} s of pause; resuming.")
        else:
            self._log(f"GPU cooled from {_celsius(start_temp)} to {temp:.0f} °C in {seconds:.1f} s; resuming.")

    def _check_memory(self) -> None:
        if self._read_mem is None:
            return
        mem = self._read_mem()
        if mem is None:
            return
        used, total = mem
        if total <= 0 or used / total < self.vram_warn_frac:
            return
        self.vram_warnings += 1
        self._log(
            f"GPU memory at {used / total:.0%} ({used / 2**30:.2f} of {total / 2**30:.2f} GiB, warning at "
            f"{self.vram_warn_frac:.0%}): emptying the CUDA cache. If out-of-memory errors follow, lower "
            "--frames or --image-size, or turn on --grad-checkpointing."
        )
        self._empty_cache()
        self.cache_empties += 1

    def summary(self) -> dict:
        """JSON-able counts for a run summary."""
        return {
            "active": self.active,
            "disabled_reason": self.disabled_reason,
            "temp_pause_c": self.temp_pause_c,
            "temp_resume_c": self.temp_resume_c,
            "max_wait_s": self.max_wait_s,
            "vram_warn_frac": self.vram_warn_frac,
            "pauses": len(self.pauses),
            "paused_seconds": round(sum(p.seconds for p in self.pauses), 3),
            "vram_warnings": self.vram_warnings,
            "cache_empties": self.cache_empties,
        }


def _celsius(temp: float | None) -> str:
    return "unreadable" if temp is None else f"{temp:.0f} °C"


# ----------------------------------------------------------------------------------------------------------------
# Out-of-memory handling

_CPU_OOM_MARKERS = ("not enough memory", "defaultcpuallocator", "cuda out of memory", "out of memory")


def is_oom(exc: BaseException) -> bool:
    """True for CUDA out-of-memory errors and the CPU allocator's "not enough memory" RuntimeErrors (an
    `ArenaError` never is, whatever its message says: it is the answer, not something to retry)."""
    if isinstance(exc, ArenaError):
        return False
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(marker in text for marker in _CPU_OOM_MARKERS)
    return False


def halving_schedule(start: int, *, minimum: int = 4) -> list[int]:
    """`start`, then halves down to `minimum` (inclusive): 24 -> [24, 12, 6, 4]; start below minimum -> [start]."""
    if start < 1 or minimum < 1:
        raise ValueError(f"start and minimum must be >= 1, got start={start}, minimum={minimum}.")
    out = [start]
    while out[-1] > minimum:
        out.append(max(minimum, out[-1] // 2))
    return out


def run_with_oom_fallback(
    fn: Callable[[T], R],
    schedule: Iterable[T],
    *,
    what: str = "frames",
    log: Callable[[str], None] | None = None,
    on_oom: Callable[[T, BaseException], None] | None = None,
) -> tuple[R, T]:
    """Call `fn(size)` for each size of `schedule` until one does not run out of memory.

    Between tries the CUDA cache is emptied and `on_oom(size, exc)` runs (e.g. to zero half-accumulated
    gradients). Errors other than out-of-memory propagate at once.

    Returns:
        (result, the size that worked).

    Raises:
        OutOfMemoryAfterFallback: when the last size also ran out of memory (the cause is chained).
        ValueError: for an empty schedule.
    """
    log = log or logger.warning
    sizes = list(schedule)
    if not sizes:
        raise ValueError("run_with_oom_fallback needs at least one size in the schedule.")
    for i, size in enumerate(sizes):
        try:
            return fn(size), size
        except Exception as exc:
            if not is_oom(exc):
                raise
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if on_oom is not None:
                on_oom(size, exc)
            # Drop the traceback's references to the failed step's tensors before emptying the cache.
            del exc
            empty_cuda_cache()
            if i + 1 == len(sizes):
                raise OutOfMemoryAfterFallback(
                    f"out of memory even with {what}={size} (tried {sizes}): {first_line}. "
                    "Try a smaller --image-size, --grad-checkpointing, or a machine with more memory."
                ) from None
            log(f"out of memory with {what}={size} ({first_line}); cache cleared, retrying with {what}={sizes[i + 1]}.")
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------------------------
# Summary for run records


def hardware_summary() -> dict:
    """JSON-able description of the machine: CPU, torch, CUDA devices (name, memory), driver when NVML works."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "devices": [],
        "driver": None,
    }
    if torch.cuda.is_available():
        info["cuda_version"] = torch.version.cuda
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["devices"].append(
                {"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 2),
                 "capability": f"{props.major}.{props.minor}"}
            )
        try:
            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            info["driver"] = driver.decode() if isinstance(driver, bytes) else str(driver)
        except Exception:  # noqa: BLE001 - the driver version is nice to have, not needed
            pass
    return info
