"""`arena doctor`: check that a machine and a data folder are ready, fast and without network.

Each check gives one :class:`Check` row (ok / warn / FAIL). Essential checks (the data layout when a data folder
is given, torch, torchcodec with its FFmpeg libraries) decide the exit status; the rest (ffmpeg CLI, GPU, NVML,
pretrained weights, the face detector) only warn, because every stage has a CPU / ``--no-pretrained`` /
``--crop none`` path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from huggingface_hub import try_to_load_from_cache

from arena.data import scan_dataset
from arena.limits import DEFAULT_BACKBONE

# torch, torchcodec and timm are imported inside the checks on purpose: reporting that they do not import (or
# cannot load FFmpeg) is what the doctor is for, so a broken stack must not break importing this module.

__all__ = ["COMPETITION_COUNTS", "Check", "DoctorResult", "run_doctor", "sniff_container", "weights_status"]

COMPETITION_COUNTS = (300, 300, 200)  # real train, fake train, test of the real competition
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class Check:
    """One row of the doctor table."""

    name: str
    status: Literal["ok", "warn", "fail"]
    detail: str
    essential: bool = False

    def __post_init__(self) -> None:
        if self.status not in ("ok", "warn", "fail"):
            raise ValueError(f"Check status must be ok, warn or fail, got {self.status!r}")


@dataclass
class DoctorResult:
    """All checks, plus the layout report text when a data folder was checked."""

    checks: list[Check] = field(default_factory=list)
    layout_report: str = ""

    @property
    def ok(self) -> bool:
        """True when no essential check failed (exit status 0)."""
        return not any(c.status == "fail" and c.essential for c in self.checks)

    def table(self) -> str:
        """The checks as a fixed-width table, one line per check (long details wrap under their row)."""
        width = max((len(c.name) for c in self.checks), default=4)
        lines = [f"{'check':<{width}}  status  detail", f"{'-' * width}  ------  {'-' * 50}"]
        for c in self.checks:
            status = {"ok": "ok", "warn": "warn", "fail": "FAIL"}[c.status]
            first, *rest = c.detail.splitlines() or [""]
            lines.append(f"{c.name:<{width}}  {status:<6}  {first}")
            lines += [f"{'':<{width}}          {line}" for line in rest]
        verdict = "all essential checks passed" if self.ok else "essential checks FAILED (see FAIL rows)"
        lines.append(f"\n{verdict}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- weights


def _hub_locations(name: str) -> tuple[list[tuple[str, str]], str | None]:
    """(repo_id, filename) pairs to look for in the HF cache, and the legacy download URL, for a timm name."""
    repo, filenames, url = f"timm/{name}", list(_HUB_FILES), None
    try:
        import timm.models

        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # unknown name or timm missing: fall back to the naming convention of the timm hub
        cfg = None
    if cfg is not None:
        repo = getattr(cfg, "hf_hub_id", None) or repo
        if getattr(cfg, "hf_hub_filename", None):
            filenames.insert(0, cfg.hf_hub_filename)
        url = getattr(cfg, "url", None)
    return [(repo, f) for f in dict.fromkeys(filenames)], url


def weights_status(name: str = DEFAULT_BACKBONE, weights: str | os.PathLike | None = None, *,
                   hf_cache_dir: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Whether backbone weights can be loaded offline, and from where. Never touches the network.

    Args:
        name: timm model name (``inception_resnet_v2.tf_in1k``).
        weights: a local weights file; when given, only this file counts.
        hf_cache_dir: Hugging Face hub cache to search (default: the one huggingface_hub uses, HF_HUB_CACHE).

    Returns:
        ``(True, "file:<path>" | "hf-cache:<path>" | "torch-hub:<path>")`` when a local file is there, else
        ``(False, message)`` saying what was looked for and what to do.
    """
    if weights is not None:
        path = Path(weights)
        if path.is_file() and path.stat().st_size > 0:
            return True, f"file:{path}"
        what = "is empty" if path.is_file() else ("is a folder" if path.is_dir() else "does not exist")
        return False, f"weights file {str(path)!r} {what}; give a .safetensors/.pth state_dict of {name}"
    repo_files, url = _hub_locations(name)
    for repo_id, filename in repo_files:
        repo_id, _, revision = repo_id.partition("@")
        # A pure file-system lookup (refs/ + snapshots/): no HEAD request, so no hub retries offline.
        found = try_to_load_from_cache(repo_id, filename, cache_dir=hf_cache_dir, revision=revision or None)
        if isinstance(found, str) and os.path.isfile(found):
            return True, f"hf-cache:{found}"
    if url:
        try:
            import torch.hub

            local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
            if local.is_file():
                return True, f"torch-hub:{local}"
        except ImportError:
            pass
    looked = ", ".join(f"{r}/{f}" for r, f in repo_files)
    return False, (f"{name}: not reachable offline (not in the local Hugging Face cache: {looked}); "
                   "use --weights PATH or --no-pretrained")


# ------------------------------------------------------------------------------------- container sniff

# (offset, magic) -> container. Reading 16 bytes is not decoding: it only flags files that cannot be videos
# (a text file or an HTML error page renamed .mp4) before a long features run reaches them.
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")
_SIGNATURES = ((0, b"\x1a\x45\xdf\xa3", "matroska/webm"), (0, b"FLV", "flv"), (0, b"OggS", "ogg"),
               (0, b"\x00\x00\x01\xba", "mpeg-ps"), (0, b"\x30\x26\xb2\x75", "asf/wmv"),
               (0, b"\x00\x00\x00\x01", "h264/hevc elementary stream"))


def sniff_container(path: str | os.PathLike) -> str | None:
    """The container family a file's first bytes announce (``"mp4/mov"``, ``"matroska/webm"``, ...), or None."""
    with open(path, "rb") as f:
        head = f.read(192)
    if head[4:8] in _MP4_BOXES:
        return "mp4/mov"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "mpeg-ts"
    for offset, magic, name in _SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return name
    return None


# ----------------------------------------------------------------------------------------------- checks


def _check_data(data: Path, expect: tuple[int, int, int] | None, result: DoctorResult) -> None:
    try:
        ds = scan_dataset(data)
    except OSError as e:  # the scan reports bad content itself; this is the file system failing under it
        result.checks.append(Check("data layout", "fail", f"{data}: cannot be scanned ({e})", essential=True))
        return
    rep = ds.report
    result.layout_report = str(rep)
    c = rep.counts
    found = (c.get("train_real", 0), c.get("train_fake", 0), c.get("test", 0))
    counts = f"{found[0]} real / {found[1]} fake train, {found[2]} test"
    if not rep.ok:
        result.checks.append(Check("data layout", "fail", f"{data}: {len(rep.errors)} error(s): {rep.errors[0]}",
                                   essential=True))
    else:
        extra = f", {len(rep.warnings)} warning(s) (see the report below)" if rep.warnings else ""
        result.checks.append(Check("data layout", "warn" if rep.warnings else "ok", f"{data}{extra}",
                                   essential=True))
    unknown = []
    for item in (*ds.train, *ds.test):
        try:
            if sniff_container(item.path) is None:
                unknown.append(item.key)
        except OSError as e:
            unknown.append(f"{item.key} ({e.strerror})")
    n = len(ds.train) + len(ds.test)
    if unknown:
        result.checks.append(Check("video headers", "warn", f"{len(unknown)} of {n} files do not start like a video "
                                   f"container (e.g. {', '.join(unknown[:3])}); the decoder will report them"))
    else:
        result.checks.append(Check("video headers", "ok", f"{n} files start like video containers"))
    if expect is None:
        result.checks.append(Check("data counts", "ok", counts))
    elif found == tuple(expect):
        result.checks.append(Check("data counts", "ok", f"{counts} (as expected)"))
    else:
        result.checks.append(Check("data counts", "warn", f"{counts}; expected {expect[0]} / {expect[1]}, {expect[2]}"
                                   " (fine for demo or partial data)"))


def _check_stack(result: DoctorResult) -> bool:
    """Versions of torch, torchvision, torchcodec; False when torch itself does not import."""
    try:
        import torch
    except Exception as e:
        result.checks.append(Check("torch", "fail", f"does not import: {e}; run `make setup`", essential=True))
        return False
    parts = [f"torch {torch.__version__}"]
    for mod in ("torchvision", "timm"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except Exception as e:
            result.checks.append(Check(mod, "fail", f"does not import: {str(e).splitlines()[0]}; run `make setup`",
                                       essential=True))
    result.checks.append(Check("torch stack", "ok", ", ".join(parts), essential=True))
    try:
        import torchcodec
        from torchcodec._core import ops as tc_ops  # private, but the only place that says whether FFmpeg loaded
    except Exception as e:
        result.checks.append(Check("torchcodec", "fail", f"does not import: {str(e).splitlines()[0]}; it must be "
                                   "the version paired with this torch (see pyproject.toml)", essential=True))
        return True
    available = getattr(tc_ops, "_FFMPEG_AVAILABLE", None)
    major = getattr(tc_ops, "ffmpeg_major_version", None)
    if available is False:
        try:
            from torchcodec._internally_replaced_utils import load_core_libraries

            load_core_libraries()
            reason = "unknown reason"
        except Exception as e:
            reason = str(e).splitlines()[0]
        result.checks.append(Check("torchcodec + FFmpeg", "fail", f"torchcodec {torchcodec.__version__} cannot load "
                                   f"the FFmpeg shared libraries ({reason}); install FFmpeg 4-7 libraries "
                                   "(Debian: apt-get install ffmpeg) or run `make setup`", essential=True))
    else:
        libs = f"FFmpeg {major} libraries loaded" if major else "FFmpeg libraries loaded"
        result.checks.append(Check("torchcodec + FFmpeg", "ok", f"torchcodec {torchcodec.__version__}, {libs}",
                                   essential=True))
    return True


def _check_ffmpeg_cli(result: DoctorResult) -> None:
    exe = shutil.which("ffmpeg")
    if exe is None:
        result.checks.append(Check("ffmpeg CLI", "warn", "not on PATH (only the decode benchmark and some test "
                                   "fixtures need it)"))
        return
    try:
        out = subprocess.run([exe, "-hide_banner", "-version"], capture_output=True, text=True, timeout=5)
        first = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "no output"
        status = "ok" if out.returncode == 0 else "warn"
    except (OSError, subprocess.TimeoutExpired) as e:
        first, status = f"`ffmpeg -version` failed: {e}", "warn"
    result.checks.append(Check("ffmpeg CLI", status, f"{first} ({exe})"))


def _check_gpu(result: DoctorResult) -> None:
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = ", ".join(sorted({torch.cuda.get_device_name(i) for i in range(n)}))
        result.checks.append(Check("CUDA GPU", "ok", f"{n} x {names} (CUDA {torch.version.cuda})"))
    else:
        built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only torch build"
        result.checks.append(Check("CUDA GPU", "warn", f"none available ({built}); every stage runs on CPU, slowly"))
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        result.checks.append(Check("NVML", "ok", f"driver {driver}, {count} device(s): temperature/VRAM guard active"))
    except Exception as e:
        result.checks.append(Check("NVML", "warn", f"not available ({type(e).__name__}: {str(e)[:80]}); the "
                                   "temperature/VRAM guard is off"))


def _check_face_detector(result: DoctorResult) -> None:
    """The default face detector of ``--crop faces``: package, version, licence; a warning (``--crop none`` works
    without it) with the install command when it is missing. Other installed detectors are named on the same line."""
    try:
        from arena.faces.detect import DETECTORS, detector_info  # imports torch: reported above when it is broken
    except ImportError as e:
        result.checks.append(Check("face detector", "warn", f"not checked: {str(e).splitlines()[0][:120]}"))
        return
    info = detector_info(DETECTORS[0])
    others = [f"{i['name']} ({i['package']} {i['version']})" for i in map(detector_info, DETECTORS[1:])
              if i["available"]]
    also = f"; also installed: {', '.join(others)}" if others else ""
    if info["available"]:
        detail = f"{info['name']}: {info['package']} {info['version']} ({info['licence']}), {info['note']}{also}"
        result.checks.append(Check("face detector", "ok", detail))
    else:
        result.checks.append(Check("face detector", "warn", f"{info['name']}: {info['package']} {info['note']} "
                                   f"(needed by --crop faces only){also}"))


def run_doctor(data: str | os.PathLike | None = None, *, backbone: str = DEFAULT_BACKBONE,
               weights: str | os.PathLike | None = None,
               expect: tuple[int, int, int] | None = COMPETITION_COUNTS) -> DoctorResult:
    """Run every check; see :class:`DoctorResult` for the verdict and the table.

    Args:
        data: data folder to check (layout and counts); None skips the data checks.
        backbone: timm model name whose pretrained weights must be reachable offline.
        weights: local weights file (``--weights``); when given, it is what gets checked.
        expect: expected (real, fake, test) counts, or None to only print what is found.
    """
    result = DoctorResult()
    if data is not None:
        _check_data(Path(data), expect, result)
    torch_ok = _check_stack(result)
    _check_ffmpeg_cli(result)
    if torch_ok:
        _check_gpu(result)
    _check_face_detector(result)
    ok, detail = weights_status(backbone, weights)
    result.checks.append(Check("backbone weights", "ok" if ok else "warn", detail))
    return result
