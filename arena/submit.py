"""The submission CSV: formatting, validation, crash-safe writing, and verification against the feature cache.

The CSV is the output that counts, so it is only ever replaced by a file that passed every check: the text is
built in memory, validated check by check, written to a temporary file beside the target, fsynced, and renamed
over the target with ``os.replace`` (atomic on POSIX). A crash or ``kill -9`` at any moment therefore leaves
either the previous complete CSV or the new complete one, never a partial file.
"""

from __future__ import annotations

import csv
import glob
import io
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from arena.predict import LoadedModel, VideoPrediction

HEADER = ("filename", "label", "probability")
PROBABILITY_DIGITS = 6  # fixed digits: same predictions -> byte-identical file
VERIFY_TOLERANCE = 1e-3


class SubmissionError(RuntimeError):
    """The submission could not be produced or did not pass validation / verification."""


def label_and_confidence(p_fake: float) -> tuple[int, float]:
    """Label (1 = fake) and the confidence of that label, ``max(p, 1 - p)``, as the seed wrote them.

    A video at exactly 0.5 (e.g. a failed decode) is labelled real with confidence 0.5.
    """
    if not (0.0 <= p_fake <= 1.0) or math.isnan(p_fake):
        raise SubmissionError(f"p_fake must be in [0, 1], got {p_fake}.")
    label = int(p_fake > 0.5)
    return label, (p_fake if label == 1 else 1.0 - p_fake)


def format_submission(filenames: Sequence[str], p_fake: Sequence[float]) -> str:
    """The CSV text ``filename,label,probability`` with probabilities at a fixed number of digits."""
    if len(filenames) != len(p_fake):
        raise SubmissionError(f"{len(filenames)} filenames but {len(p_fake)} probabilities.")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)
    for name, p in zip(filenames, p_fake, strict=True):
        label, conf = label_and_confidence(float(p))
        writer.writerow([name, label, f"{conf:.{PROBABILITY_DIGITS}f}"])
    return buf.getvalue()


@dataclass(frozen=True)
class Check:
    """One validation check: its name, whether it passed, and what was found."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"  [{'ok' if self.ok else 'FAIL'}] {self.name}: {self.detail}"


def validate_submission(text: str, expected_filenames: Sequence[str]) -> list[Check]:
    """Run every check on the CSV text against the filenames of ``test_public.csv`` (in their order).

    Returns all checks (passed or not); see ``check_submission`` for the raising variant.
    """
    checks: list[Check] = []
    rows = list(csv.reader(io.StringIO(text)))
    header = tuple(rows[0]) if rows else ()
    body = rows[1:]
    checks.append(Check("header", header == HEADER, f"{','.join(header) or '(empty file)'} (want {','.join(HEADER)})"))

    want = len(expected_filenames)
    checks.append(Check("row count", len(body) == want, f"{len(body)} rows, test_public.csv lists {want}"))

    bad_width = [i + 2 for i, r in enumerate(body) if len(r) != len(HEADER)]
    missing = [i + 2 for i, r in enumerate(body) if len(r) != len(HEADER) or any(c.strip() == "" for c in r)]
    checks.append(
        Check("no missing values", not missing,
              "none" if not missing else f"lines {missing[:5]} have empty or missing cells")
    )
    names = [r[0] if r else "" for r in body]
    counts = Counter(names)
    dupes = sorted(n for n, c in counts.items() if c > 1)
    absent = [n for n in expected_filenames if n not in counts]
    extra = sorted(set(names) - set(expected_filenames))
    ok_names = not dupes and not absent and not extra
    detail = "each once" if ok_names else f"duplicated {dupes[:3]}, missing {absent[:3]}, unexpected {extra[:3]}"
    checks.append(Check("every filename exactly once", ok_names, detail))
    checks.append(
        Check("order of test_public.csv", names == list(expected_filenames),
              "same order" if names == list(expected_filenames) else "rows are not in test_public.csv order")
    )

    labels = [r[1] for r in body if len(r) == len(HEADER)]
    bad_labels = sorted({v for v in labels if v not in ("0", "1")})
    checks.append(Check("labels in {0, 1}", not bad_labels and not bad_width,
                        "ok" if not bad_labels else f"found {bad_labels[:5]}"))

    probs: list[float] = []
    unparsable = []
    for r in body:
        if len(r) != len(HEADER):
            continue
        try:
            probs.append(float(r[2]))
        except ValueError:
            unparsable.append(r[2])
    out_of_range = [p for p in probs if not (0.0 <= p <= 1.0)]  # NaN fails this too
    checks.append(
        Check("probabilities in [0, 1]", not unparsable and not out_of_range and not bad_width,
              "ok" if not (unparsable or out_of_range) else f"bad values {(unparsable + out_of_range)[:5]}")
    )
    below = [p for p in probs if p < 0.5]
    checks.append(
        Check("probabilities >= 0.5 (confidence of the predicted class)", not below,
              "ok" if not below else f"{len(below)} below 0.5, e.g. {below[:3]}")
    )
    return checks


def check_submission(
    text: str, expected_filenames: Sequence[str], *, echo: Callable[[str], None] | None = print
) -> list[Check]:
    """Validate, printing each check; raise ``SubmissionError`` naming the failed checks."""
    checks = validate_submission(text, expected_filenames)
    if echo is not None:
        echo("Validating the submission:")
        for c in checks:
            echo(c.line())
    failed = [c for c in checks if not c.ok]
    if failed:
        raise SubmissionError(
            "The submission failed validation (" + "; ".join(f"{c.name}: {c.detail}" for c in failed)
            + "); the previous CSV was left untouched."
        )
    return checks


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers only ever see the old or the new complete file.

    Temporary file in the same folder (same file system, so the rename is atomic), fsync of the data,
    ``os.replace``, then fsync of the folder so the rename itself survives a power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening a folder; the data itself is already synced
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files a killed writer left beside ``path`` (their pid is no longer running)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid_text = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # that writer is still running
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # a live process of another user
            continue


def detail_csv(predictions: Sequence[VideoPrediction], filenames: Sequence[str], variants: Sequence[str]) -> str:
    """``predictions_detail.csv``: p_fake, per-variant p_fake, frames used, fallback and status/error per video."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["filename", "key", "p_fake", "label", "probability", *[f"p_{v}" for v in variants], "frames_requested",
         "frames_used", "distinct_frames", "num_source_frames", "variants_used", "fallback", "status", "error"]
    )
    for name, pred in zip(filenames, predictions, strict=True):
        label, conf = label_and_confidence(pred.p_fake)
        per_variant = [
            f"{pred.variant_p[v]:.{PROBABILITY_DIGITS}f}" if v in pred.variant_p else "" for v in variants
        ]
        writer.writerow(
            [name, pred.key, f"{pred.p_fake:.{PROBABILITY_DIGITS}f}", label, f"{conf:.{PROBABILITY_DIGITS}f}",
             *per_variant, pred.frames_requested, pred.frames_used, pred.distinct_frames, pred.num_source_frames,
             len(pred.variant_p), pred.fallback, pred.status, pred.error]
        )
    return buf.getvalue()


@dataclass
class SubmissionReport:
    """What ``write_submission`` produced."""

    path: Path
    detail_path: Path
    rows: int
    checks: list[Check]
    fallbacks: Counter = field(default_factory=Counter)


def write_submission(
    predictions: Sequence[VideoPrediction],
    filenames: Sequence[str],
    out: str | Path,
    *,
    variants: Sequence[str],
    detail_path: str | Path | None = None,
    echo: Callable[[str], None] | None = print,
) -> SubmissionReport:
    """Validate, then atomically write the CSV and ``predictions_detail.csv`` beside it.

    Args:
        predictions: one per test video, in ``test_public.csv`` order.
        filenames: the filenames exactly as ``test_public.csv`` spells them, in its order.
        out: the submission CSV.
        variants: TTA variant names, for the detail columns.
        detail_path: default ``<out folder>/predictions_detail.csv``.
        echo: where check lines go (None: silent).

    Raises:
        SubmissionError: a failed check; nothing was written, the previous CSV is untouched.
    """
    out = Path(out)
    detail_path = Path(detail_path) if detail_path is not None else out.parent / "predictions_detail.csv"
    if len(predictions) != len(filenames):
        raise SubmissionError(f"{len(predictions)} predictions for {len(filenames)} test videos: a row was dropped.")
    text = format_submission(filenames, [p.p_fake for p in predictions])
    checks = check_submission(text, filenames, echo=echo)
    # The detail file first: once the CSV that counts is new, its detail file is new as well.
    atomic_write_text(detail_path, detail_csv(predictions, filenames, variants))
    atomic_write_text(out, text)
    fallbacks = Counter(p.fallback for p in predictions if p.fallback != "none")
    return SubmissionReport(path=out, detail_path=detail_path, rows=len(predictions), checks=checks,
                            fallbacks=fallbacks)


# ----------------------------------------------------------------------------------------------------------------
# Verification: the full-video path against the cache path


@dataclass
class VerifyResult:
    """Outcome of ``verify_against_cache``.

    Attributes:
        mode: ``cache-features`` (same weights: p_fake from cached features vs the full path) or ``finetuned``
            (the backbone changed: cache encoder on the full path's frames vs cached features, and the head on the
            full path's own features through the cache-path logic vs the full path).
        keys: the videos compared.
        max_abs_diff: largest |p_fake difference| (the criterion, tolerance ``tolerance``).
        max_feature_diff: finetuned mode: largest |feature difference| relative to the feature scale.
        skipped: videos not compared, with reasons (failed decode, not in cache, a fallback changed the frames).
        lines: human-readable report.
    """

    mode: str
    keys: list[str]
    max_abs_diff: float
    tolerance: float
    max_feature_diff: float | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.keys) and self.max_abs_diff <= self.tolerance and (
            self.max_feature_diff is None or self.max_feature_diff <= self.tolerance * 10
        )


def sample_keys(keys: Sequence[str], n: int | None, *, seed: int) -> list[str]:
    """``n`` keys drawn without replacement with ``seed`` (all of them when n is None or >= len), in input order."""
    keys = list(keys)
    if n is None or n >= len(keys):
        return keys
    if n < 1:
        raise SubmissionError(f"--verify-sample must be >= 1, got {n}.")
    pick = np.random.default_rng(seed).choice(len(keys), size=n, replace=False)
    return [keys[i] for i in sorted(pick)]


def open_verify_cache(model: LoadedModel, cache_path: str | Path):
    """Open the cache ``--verify`` names and check it can verify this model (frame count, variants, weights).

    Called before predicting, so a wrong cache fails in seconds, not after the whole test set.
    """
    from arena.cache import CacheError, FeatureCache

    try:
        cache = FeatureCache.open(cache_path)
    except (CacheError, OSError) as exc:
        raise SubmissionError(f"--verify {cache_path}: {exc}") from exc
    prov = cache.provenance
    k = model.frames
    if k not in tuple(prov.frame_counts):
        raise SubmissionError(
            f"Cannot verify against {cache_path}: it holds frame counts {tuple(prov.frame_counts)}, the submission "
            f"uses {k} frames. Rebuild the cache with --frames including {k}, or submit with --frames "
            f"{prov.frame_counts[0]}."
        )
    missing_variants = [v for v in model.variants if v not in tuple(prov.variants)]
    if missing_variants:
        raise SubmissionError(
            f"Cannot verify against {cache_path}: variants {missing_variants} are not in the cache "
            f"(it has {tuple(prov.variants)}). Rebuild the cache with TTA, or submit with --no-tta."
        )
    if model.kind == "head-only" and model.encoder.weights_hash() != prov.weights_hash:
        raise SubmissionError(
            f"Cannot verify against {cache_path}: the submission encoder's weights hash "
            f"{model.encoder.weights_hash()[:12]} differs from the cache's {prov.weights_hash[:12]} (the head was "
            "tuned on another cache?). Pass the cache tune-head used."
        )
    return cache


def verify_against_cache(
    model: LoadedModel,
    cache_path: str | Path,
    predictions: Sequence[VideoPrediction],
    *,
    items: Sequence,
    sample: int | None = 8,
    seed: int = 0,
    device: str | None = None,
    workers: int = 0,
    batch_size: int = 64,
    amp: bool = True,
    tolerance: float = VERIFY_TOLERANCE,
) -> VerifyResult:
    """Prove the full-video path and the cache path compute the same thing, on a sample of test videos.

    Same weights (head-only model, encoder identical to the cache's): p_fake recomputed from the cached features
    of every variant with the same head must equal the full path's p_fake within ``tolerance``. This proves the
    decode, frame indices, TTA, resize and normalisation of both paths agree (else the features would differ).

    Fine-tuned backbone (features not in the cache): (1) the cache's encoder, recreated from the cache's
    provenance (weights hash checked), is run on the frames the full path decodes and compared with the cached
    features: this proves decode/TTA/preprocess equality; (2) the fine-tuned head is applied to the full path's
    own features through the cache-path logic (float16 storage round trip, per-k mask, variant averaging) and
    compared with the full path's p_fake: this proves the head part of both paths agree.
    """
    from arena.predict import head_probabilities, recreate_encoder
    from arena.runtime import resolve_device

    dev = resolve_device(device or "auto") if isinstance(device, str) or device is None else device
    cache = open_verify_cache(model, cache_path)
    prov = cache.provenance
    by_key = {p.key: p for p in predictions}
    item_by_key = {it.key: it for it in items}
    cached = set(cache.keys)
    variants = tuple(model.variants)
    skipped: dict[str, str] = {}
    k = model.frames
    candidates = []
    for key, pred in by_key.items():
        if key not in cached:
            skipped[key] = "not in the cache"
        elif pred.status == "failed" or pred.fallback != "none" or pred.frames_used != k:
            skipped[key] = f"full path used a fallback ({pred.fallback}, status {pred.status})"
        elif cache.status(key) == "failed":
            skipped[key] = "failed in the cache"
        else:
            candidates.append(key)
    keys = sample_keys(candidates, sample, seed=seed)
    lines = []
    if model.kind == "head-only":
        diffs = []
        for key in keys:
            feats, mask = _cached_views(cache, key, k, variants)
            p_var, _ = head_probabilities(model.head, feats, mask, device=dev, round_fp16=False)
            p_cache = float(np.mean(p_var))
            diffs.append(abs(p_cache - by_key[key].p_fake))
        max_diff = max(diffs, default=float("inf"))
        result = VerifyResult("cache-features", keys, max_diff, tolerance, skipped=skipped)
        lines.append(
            f"verify (same weights {prov.weights_hash[:12]}): p_fake from cached features vs full path on "
            f"{len(keys)} videos: max |diff| = {max_diff:.2e} (tolerance {tolerance:.0e})"
        )
    else:
        from arena.features import ClipDataset, encode_views

        enc = recreate_encoder(prov, device=dev)
        sub_items = [item_by_key[key] for key in keys]
        ds = ClipDataset(sub_items, size=tuple(prov.input_size), variants=variants, frames=k)
        feat_diffs, p_diffs = [], []
        for i, key in enumerate(keys):
            clip = ds[i]
            if clip.views is None:
                skipped[key] = f"decode failed now: {clip.message}"
                continue
            ours = encode_views(enc, clip.views, device=dev, batch_size=batch_size, amp=amp).numpy()
            theirs, _ = _cached_views(cache, key, k, variants)
            scale = float(np.abs(theirs).max()) or 1.0
            feat_diffs.append(float(np.abs(ours - theirs.astype(np.float32)).max()) / scale)
            full = by_key[key].features
            if full is None:
                skipped[key] = "full path kept no features for this video"
                continue
            p_var, _ = head_probabilities(model.head, full.astype(np.float16), by_key[key].valid, device=dev,
                                          round_fp16=False)
            p_diffs.append(abs(float(np.mean(p_var)) - by_key[key].p_fake))
        max_diff = max(p_diffs, default=float("inf"))
        max_feat = max(feat_diffs, default=float("inf"))
        result = VerifyResult("finetuned", [k_ for k_ in keys if k_ not in skipped], max_diff, tolerance,
                              max_feature_diff=max_feat, skipped=skipped)
        lines.append(
            f"verify (fine-tuned backbone): cache encoder {prov.backbone} on the full path's frames vs cached "
            f"features: max relative |diff| = {max_feat:.2e} (tolerance {tolerance * 10:.0e}) -> decode/TTA/"
            "preprocess agree"
        )
        lines.append(
            f"verify: fine-tuned head on the full path's own features through the cache-path logic: max |p diff| "
            f"= {max_diff:.2e} (tolerance {tolerance:.0e})"
        )
    if skipped:
        lines.append(f"verify: {len(skipped)} videos not compared: " + "; ".join(
            f"{key}: {why}" for key, why in list(skipped.items())[:5]))
    result.lines = lines
    return result


def _cached_views(cache, key: str, k: int, variants: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Cached features of every variant: float16 ``[V, k, d]`` and the mask ``[k]``."""
    feats, mask = [], None
    for v in variants:
        f, m = cache.features(key, k, v)
        feats.append(np.asarray(f))
        mask = np.asarray(m, dtype=bool) if mask is None else mask
    return np.stack(feats), mask


# ----------------------------------------------------------------------------------------------------------------
# The whole command


@dataclass
class SubmitResult:
    """What ``make_submission`` did."""

    report: SubmissionReport
    verify: VerifyResult | None
    lines: list[str]
    predictions: list = field(default_factory=list)


def make_submission(
    *,
    data: str | Path,
    models: str | Path,
    out: str | Path,
    kind: str = "auto",
    frames: int | None = None,
    tta: bool = True,
    device: str = "auto",
    workers: int = 2,
    batch_size: int = 64,
    amp: bool = True,
    verify: str | Path | None = None,
    verify_sample: int | None = 8,
    seed: int = 0,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
) -> SubmitResult:
    """Predict every test video through the full-video path, verify, validate and write the submission.

    Order of events: predict -> (verify against the cache) -> validate -> atomic write. Any failure before the
    write (verification above tolerance, a failed check) raises ``SubmissionError`` and leaves the previous CSV
    untouched.

    Args:
        data: data folder (``test_public.csv`` + ``test/``).
        models: models folder (fine-tuned checkpoint or tuned head, ``frame_test.json``).
        out: the submission CSV (``predictions_detail.csv`` goes beside it).
        kind: ``auto``, ``finetuned`` or ``head-only``.
        frames: frames per video (default: frame_test.json, else 24).
        tta: average the five TTA variants.
        verify: a feature cache to verify the full path against.
        verify_sample: videos compared (None: all).
        seed: seeds torch and the verification sample; same seed, same inputs -> byte-identical CSV.
    """
    from arena.data import load_dataset
    from arena.predict import failed_prediction, load_model, predict_items, submission_rows
    from arena.runtime import resolve_device

    say = echo or (lambda _s: None)
    torch_seed(seed)
    dev = resolve_device(device)
    dataset = load_dataset(data)
    rows = submission_rows(dataset)
    if not rows:
        raise SubmissionError(f"{data}: test_public.csv lists no test video; nothing to submit.")
    model = load_model(models, kind=kind, frames=frames, tta=tta, device=dev)
    say(f"model: {model.kind} ({model.source}), {model.frames} frames ({model.frames_source}), "
        f"TTA {len(model.variants)} variant(s), device {dev}")
    if verify is not None:
        open_verify_cache(model, verify)  # fail fast, before the whole test set is predicted
    item_by_key = {it.key: it for it in dataset.test}
    items = [item_by_key[r.key] for r in rows if r.key is not None]
    run = predict_items(items, model, device=dev, workers=workers, batch_size=batch_size, amp=amp,
                        keep_features=verify is not None and model.kind == "finetuned", progress=progress,
                        desc="submit")
    by_key = {p.key: p for p in run.predictions}
    predictions = [
        by_key[r.key] if r.key is not None else
        failed_prediction(r.filename, label=None, frames=model.frames, fallback="0.5 (missing file)", error=r.problem)
        for r in rows
    ]
    lines = run.summary_lines()
    missing = sum(r.key is None for r in rows)
    if missing:
        lines.append(f"{missing} listed videos are missing or unusable: written with probability 0.5")
    if items and all(p.status == "failed" for p in run.predictions):
        raise SubmissionError(
            f"every one of {len(items)} test videos failed (first: {run.predictions[0].key}: "
            f"{run.predictions[0].error}); no submission written. Check the decoder with `arena inspect`."
        )
    for line in lines:
        say(line)

    vres = None
    if verify is not None:
        vres = verify_against_cache(model, verify, run.predictions, items=items, sample=verify_sample, seed=seed,
                                    device=dev, workers=0, batch_size=batch_size, amp=amp)
        for line in vres.lines:
            say(line)
        if not vres.ok:
            raise SubmissionError(
                f"verification against {verify} failed: max |p_fake diff| {vres.max_abs_diff:.2e} "
                f"(tolerance {vres.tolerance:.0e}) on {len(vres.keys)} videos; the previous CSV was left untouched. "
                "The full path and the cache path disagree: rebuild the cache with the current code and weights."
            )
    report = write_submission(predictions, [r.filename for r in rows], out, variants=model.variants, echo=echo)
    done = [f"wrote {report.path} ({report.rows} rows) and {report.detail_path}"]
    fb = Counter(p.fallback for p in predictions if p.fallback != "none")
    done.append(f"rows that needed a fallback: {sum(fb.values())}" + (f" ({dict(fb)})" if fb else ""))
    for line in done:
        say(line)
    return SubmitResult(report=report, verify=vres, lines=lines + done, predictions=predictions)


def torch_seed(seed: int) -> None:
    """Seed torch and numpy's global generators (nothing in the path draws randomly; this guards future code)."""
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
