"""The submission CSV: test order, formatting, validation, crash-safe writing, and the whole `arena submit`.

The CSV is the output that counts, so it is only ever replaced by a file that passed every check: the text is
built in memory, validated check by check and written with `arena._files.atomic_write_text` (temporary file
beside the target, fsync, ``os.replace``, fsync of the folder). A crash or ``kill -9`` at any moment therefore
leaves either the previous complete CSV or the new complete one, never a partial file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from arena._files import atomic_write_text
from arena.cache import shard_items
from arena.calibration import clip_probabilities
from arena.data import Dataset, load_dataset
from arena.distributed import Dist, gather_to_main, launched, shared_run
from arena.ensemble import (
    COMBINE_MODES,
    Combine,
    EnsembleRun,
    Member,
    PathsArg,
    as_paths,
    describe,
    member_sources,
    predict_members,
)
from arena.errors import OptionError, SubmissionError
from arena.nvdec import use_nvdec
from arena.predict import ModelKind, VideoPrediction, failed_prediction, load_model
from arena.runtime import Precision, resolve_device
from arena.verify import VerifyResult, verify_against_cache, verify_cache_for

HEADER = ("filename", "label", "probability")
PROBABILITY_DIGITS = 6  # fixed digits: same predictions -> byte-identical file
DETAIL_FILE = "predictions_detail.csv"


# ----------------------------------------------------------------------------------------------------------------
# Test order


@dataclass(frozen=True)
class SubmissionRow:
    """One row of ``test_public.csv``: the name as written there and the video's key (None when missing)."""

    filename: str
    key: str | None
    problem: str = ""


def submission_rows(dataset: Dataset) -> list[SubmissionRow]:
    """Rows of the submission: ``test_public.csv``'s names in its order (first occurrence of each), mapped to keys.

    Names whose video the data layer skipped (missing, empty, refused) keep their row with ``key=None`` and the
    reason, so the submission never drops a row. Without ``test_public.csv``: every test video, by key.
    """
    return [SubmissionRow(v.name, v.key, v.problem) for v in dataset.test_listing]


# ----------------------------------------------------------------------------------------------------------------
# The CSV


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


def detail_csv(predictions: Sequence[VideoPrediction], filenames: Sequence[str], variants: Sequence[str],
               members: Mapping[str, Sequence[VideoPrediction | None]] | None = None) -> str:
    """``predictions_detail.csv``: p_fake, per-variant p_fake, frames used, fallback and status/error per video;
    with face crops also ``faces`` (``found`` / ``none``: whole frame) and ``p_tracks`` (P(fake) per face track,
    ``;``-separated, main first; p_fake is their maximum); with ensemble ``members``, ``p_<member>``: each member's
    calibrated P(fake) (empty where the member has no prediction of the video)."""
    members = members or {}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["filename", "key", "p_fake", "label", "probability", *[f"p_{v}" for v in variants], "frames_requested",
         "frames_used", "distinct_frames", "num_source_frames", "variants_used", "fallback", "status", "error",
         "faces", "p_tracks", *[f"p_{m}" for m in members]]
    )
    for i, (name, pred) in enumerate(zip(filenames, predictions, strict=True)):
        per_member = [f"{p.p_fake:.{PROBABILITY_DIGITS}f}" if p is not None and p.status != "failed" else ""
                      for p in (preds[i] for preds in members.values())]
        label, conf = label_and_confidence(pred.p_fake)
        per_variant = [
            f"{pred.variant_p[v]:.{PROBABILITY_DIGITS}f}" if v in pred.variant_p else "" for v in variants
        ]
        writer.writerow(
            [name, pred.key, f"{pred.p_fake:.{PROBABILITY_DIGITS}f}", label, f"{conf:.{PROBABILITY_DIGITS}f}",
             *per_variant, pred.frames_requested, pred.frames_used, pred.distinct_frames, pred.num_source_frames,
             len(pred.variant_p), pred.fallback, pred.status, pred.error,
             "" if pred.faces_found is None else ("found" if pred.faces_found else "none"),
             ";".join(f"{p:.{PROBABILITY_DIGITS}f}" for p in pred.track_p), *per_member]
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
    members: Mapping[str, Sequence[VideoPrediction | None]] | None = None,
) -> SubmissionReport:
    """Validate, then atomically write the CSV and ``predictions_detail.csv`` beside it.

    Args:
        predictions: one per test video, in ``test_public.csv`` order.
        filenames: the filenames exactly as ``test_public.csv`` spells them, in its order.
        out: the submission CSV.
        variants: TTA variant names, for the detail columns.
        detail_path: default ``<out folder>/predictions_detail.csv``.
        echo: where check lines go (None: silent).
        members: an ensemble's member predictions, aligned with ``predictions`` (`detail_csv`'s ``p_<member>``).

    Raises:
        SubmissionError: a failed check; nothing was written, the previous CSV is untouched.
    """
    out = Path(out)
    detail_path = Path(detail_path) if detail_path is not None else out.parent / DETAIL_FILE
    if len(predictions) != len(filenames):
        raise SubmissionError(f"{len(predictions)} predictions for {len(filenames)} test videos: a row was dropped.")
    text = format_submission(filenames, [p.p_fake for p in predictions])
    checks = check_submission(text, filenames, echo=echo)
    # The detail file first: once the CSV that counts is new, its detail file is new as well.
    atomic_write_text(detail_path, detail_csv(predictions, filenames, variants, members))
    atomic_write_text(out, text)
    fallbacks = Counter(p.fallback for p in predictions if p.fallback != "none")
    return SubmissionReport(path=out, detail_path=detail_path, rows=len(predictions), checks=checks,
                            fallbacks=fallbacks)


# ----------------------------------------------------------------------------------------------------------------
# The whole command


@dataclass
class SubmitResult:
    """What `make_submission` did: the written files, the verification and the per-row predictions.

    ``verify`` is the one member's verification (None for an ensemble); ``verifies`` every member's, by name.
    """

    report: SubmissionReport
    verify: VerifyResult | None
    lines: list[str]
    predictions: list[VideoPrediction] = field(default_factory=list)
    verifies: dict[str, VerifyResult] = field(default_factory=dict)


def make_submission(
    *,
    data: str | Path,
    models: PathsArg = None,
    out: str | Path,
    checkpoints: PathsArg = None,
    ensemble: Combine = "prob",
    kind: ModelKind = "auto",
    frames: int | None = None,
    tta: bool = True,
    device: str = "auto",
    workers: int = 2,
    frame_batch: int = 64,
    precision: Precision = "auto",
    verify: PathsArg = None,
    verify_sample: int | None = 8,
    seed: int = 0,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
    crop: str | None = None,
    max_faces: int | None = None,
    calibration: bool = True,
    clip: float | None = None,
    decoder: str = "cpu",
    views_on: str = "cpu",
) -> SubmitResult | None:
    """Predict every test video through the full-video path, verify, validate and write the submission.

    Order of events: predict -> (verify against the cache) -> validate -> atomic write. Any failure before the
    write (verification above tolerance, a failed check) raises ``SubmissionError`` and leaves the previous CSV
    untouched.

    Under torchrun (``WORLD_SIZE`` > 1) every rank loads the models and predicts its share of the test videos (every
    WORLD_SIZE-th, from RANK) on its device (GPU ``LOCAL_RANK`` on CUDA); rank 0 gathers the predictions and does the
    rest as one process would (the same CSV, byte for byte) and returns the result; the other ranks return None
    once their share is handed over, silently.

    Args:
        data: data folder (``test_public.csv`` + ``test/``).
        models: models folder(s) (fine-tuned checkpoint or tuned head, ``frame_test.json``); a ``folds`` folder
            or a K-fold study's folder without a model of its own gives one member per fold
            (`arena.ensemble.member_sources`).
        out: the submission CSV (``predictions_detail.csv`` goes beside it).
        checkpoints: checkpoint file(s) named exactly, each one member (``best_head.pt``, ``<backbone>_best.pt``).
        ensemble: several members: average calibrated probabilities (``prob``) or logits (``logit``).
        kind: ``auto``, ``finetuned`` or ``head-only`` (for ``models`` folders).
        frames: frames per video (default: each member's frame_test.json, else 24).
        tta: average the five TTA variants.
        device, workers, frame_batch, precision: how the full-video path runs (`arena.predict.predict_items`).
        verify: feature cache(s) to verify the full path against; each member uses the one that fits it
            (`arena.verify.verify_cache_for`).
        verify_sample: videos compared (None: all).
        seed: seeds torch and the verification sample; same seed, same inputs -> byte-identical CSV.
        progress: show a progress bar. echo: where the report lines go (None: silent).
        crop: ``none``/``faces``, checked against each model's crop mode (None: the model's).
        max_faces: face tracks scored per video, the video's P(fake) being their maximum (None: the model's).
        calibration: apply each model's temperature (`arena.calibration`); False: T = 1.
        clip: write P(fake) clipped to ``[clip, 1 - clip]`` (log-loss leaderboards: one confident mistake then
            costs at most ``-log(clip)``); None: unclipped. Applied after verification, which compares raw values.
        decoder, views_on: how the test videos are decoded and where the TTA views are made
            (`arena.clips.ClipDataset`). ``verify`` re-decodes as its cache was built, whatever these say.

    Raises:
        SubmissionError: nothing to submit, every video failed, verification or validation failed.
        DataError, ModelsError, PredictError, OptionError: the data folder, a model or an option cannot be used.
    """
    echo = echo if launched().main else None  # rank 0 reports
    say = echo or (lambda _s: None)
    torch_seed(seed)
    if ensemble not in COMBINE_MODES:
        raise OptionError(f"Invalid ensemble mode ({ensemble}). Supported values are {', '.join(COMBINE_MODES)}.")
    dataset = load_dataset(data)
    rows = submission_rows(dataset)
    if not rows:
        raise SubmissionError(f"{data}: test_public.csv lists no test video; nothing to submit.")
    if clip is not None and not 0.0 < clip < 0.5:
        raise SubmissionError(f"--clip must be in (0, 0.5), got {clip}; 1e-3 or 1e-2 are usual for log-loss scoring.")
    with shared_run(resolve_device(device)) as (dist, dev):
        encoders: dict = {}  # heads tuned on one cache share its encoder
        members = [Member(s, load_model(s.path, kind=s.kind, frames=frames, tta=tta, device=dev, crop=crop,
                                        max_faces=max_faces, calibration=calibration, encoders=encoders))
                   for s in member_sources(models, checkpoints, kind=kind, echo=say)]
        for line in describe(members, ensemble, device=dev):
            say(line)
        if (decoder, views_on) != ("cpu", "cpu"):
            say(f"decoder: {'nvdec' if use_nvdec(decoder) else 'cpu'} (--decoder {decoder}); TTA views made on the "
                f"{'device' if views_on == 'device' else 'CPU'}")
        caches = as_paths(verify)
        # Fail fast, before the whole test set is predicted.
        verify_with = {m.name: _verify_cache(m, caches, len(members)) for m in members} if caches else {}
        item_by_key = {it.key: it for it in dataset.test}
        items = [item_by_key[r.key] for r in rows if r.key is not None]
        run = _predict_share(items, members, dist, combine=ensemble, device=dev, workers=workers,
                             frame_batch=frame_batch, precision=precision, progress=progress, desc="submit",
                             decoder=decoder, views_on=views_on,
                             keep_features=[m.name for m in members if caches and m.model.kind == "finetuned"])
    if run is None:
        return None  # another rank than 0: its share is with rank 0, which writes the submission
    frames0 = members[0].model.frames

    def aligned(preds: Sequence[VideoPrediction]) -> list[VideoPrediction | None]:
        by_key = {p.key: p for p in preds}
        return [by_key[r.key] if r.key is not None else None for r in rows]

    predictions = [
        p if p is not None else
        failed_prediction(r.filename, label=None, frames=frames0, fallback="0.5 (missing file)", error=r.problem)
        for p, r in zip(aligned(run.predictions), rows, strict=True)
    ]
    lines = run.summary_lines()
    if dist.enabled:
        lines.insert(1, f"  {dist.world} processes (torchrun) predicted a share each")
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

    verifies: dict[str, VerifyResult] = {}
    reference: dict = {}  # the fine-tuned members' cache-encoder check, once per cache and frames
    for m in members if caches else []:
        cache, who = verify_with[m.name], "" if len(members) == 1 else f"member {m.name}: "
        vres = verify_against_cache(m.model, cache, run.by_member[m.name], items=items, sample=verify_sample,
                                    seed=seed, device=dev, frame_batch=frame_batch, precision=precision,
                                    reference=reference, decoded=(decoder, views_on))
        verifies[m.name] = vres
        for line in vres.lines:
            say(who + line)
        if not vres.ok:
            raise SubmissionError(
                f"{who}verification against {cache} failed: max |p_fake diff| {vres.max_abs_diff:.2e} "
                f"(tolerance {vres.tolerance:.0e}) on {len(vres.keys)} videos; the previous CSV was left untouched. "
                "The full path and the cache path disagree: rebuild the cache with the current code and weights."
            )
    if clip is not None:
        predictions = [dataclasses.replace(p, p_fake=float(clip_probabilities(p.p_fake, clip))) for p in predictions]
        lines.append(f"P(fake) clipped to [{clip:g}, {1 - clip:g}] (--clip)")
        say(lines[-1])
    detail = {name: aligned(preds) for name, preds in run.by_member.items()} if len(members) > 1 else None
    report = write_submission(predictions, [r.filename for r in rows], out, variants=members[0].model.variants,
                              echo=echo, members=detail)
    done = [f"wrote {report.path} ({report.rows} rows) and {report.detail_path}"]
    fb = Counter(p.fallback for p in predictions if p.fallback != "none")
    done.append(f"rows that needed a fallback: {sum(fb.values())}" + (f" ({dict(fb)})" if fb else ""))
    for line in done:
        say(line)
    return SubmitResult(report=report, verify=verifies.get(members[0].name) if len(members) == 1 else None,
                        lines=lines + done, predictions=predictions, verifies=verifies)


def _predict_share(items: Sequence, members: Sequence[Member], dist: Dist, *, progress: bool,
                   **options) -> EnsembleRun | None:
    """`arena.ensemble.predict_members` of this rank's share of ``items`` (every ``world``-th from ``rank``, as
    `arena.cache.shard_items` deals them); on rank 0 the whole run, in ``items`` order; None on the other ranks.
    One process: the run of every item."""
    run = predict_members(shard_items(items, dist.rank, dist.world), members, progress=progress and dist.main,
                          **options)
    if not dist.enabled:
        return run
    shares = gather_to_main((run.predictions, run.by_member, run.seconds, run.frames_encoded), dist)
    if shares is None:
        return None
    where = [i for r in range(dist.world) for i in range(r, len(items), dist.world)]  # item of each share's rows

    def in_order(lists: Sequence[list[VideoPrediction]]) -> list[VideoPrediction]:
        out: list[VideoPrediction] = [None] * len(items)  # type: ignore[list-item]  # every slot is filled once
        for i, pred in zip(where, (p for preds in lists for p in preds), strict=True):
            out[i] = pred
        return out

    return dataclasses.replace(run, predictions=in_order([s[0] for s in shares]),
                               by_member={name: in_order([s[1][name] for s in shares]) for name in run.by_member},
                               seconds=max(s[2] for s in shares), frames_encoded=sum(s[3] for s in shares))


def _verify_cache(member: Member, caches: Sequence[str | os.PathLike], n_members: int) -> Path:
    """The cache that verifies ``member``; an ensemble's error names the member."""
    try:
        return verify_cache_for(member.model, caches)
    except SubmissionError as exc:
        if n_members == 1:
            raise
        raise SubmissionError(f"--verify: member {member.name} ({member.model.source}): {exc}") from exc


def torch_seed(seed: int) -> None:
    """Seed torch and numpy's global generators (nothing in the path draws randomly; this guards future code)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
