"""Dataset layout and label parsing: which videos there are, with which labels (the split is `arena.split`).

The seed's layout is::

    <data>/train_labels.csv   filename + label columns (names vary: `arena.csvfile`)
    <data>/test_public.csv    filename column
    <data>/train/real/*.mp4   label 0
    <data>/train/fake/*.mp4   label 1
    <data>/test/*.mp4         unlabelled

Every video is identified by its *key*: the posix path relative to the data folder (``train/fake/a.mp4``).
Keys are the cache keys of every later stage. This module never decodes a video: it only looks at names,
sizes and the CSVs, so scanning 800 files costs milliseconds.

Problems are collected in a :class:`LayoutReport` instead of raising on the first one: an *error* makes
training impossible (or would read outside the data folder) and :func:`load_dataset` raises
:class:`DataError` listing them; a *warning* names something skipped or suspicious, and the rest is used.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from arena.content import identical_groups
from arena.csvfile import CsvListing, is_utf8, parse_label, read_listing
from arena.errors import DataError

__all__ = [
    "VIDEO_EXTENSIONS",
    "Dataset",
    "Issue",
    "LayoutReport",
    "ListedVideo",
    "VideoItem",
    "load_dataset",
    "scan_dataset",
]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp")
TRAIN_CSV = "train_labels.csv"
TEST_CSV = "test_public.csv"
_CLASS_FOLDERS = {"real": 0, "fake": 1}
_MAX_EXAMPLES = 5  # per kind of problem in the printed report; the full list stays in report.issues


@dataclass(frozen=True)
class VideoItem:
    """One video of the dataset.

    Attributes:
        key: path relative to the data folder, posix (``train/real/a.mp4``); the cache key everywhere.
        path: resolved absolute path (checked to lie inside the data folder).
        label: 0 real, 1 fake, None for test videos.
        split: "train" / "val" once assigned by a :class:`Split`, "test" for test videos, else None.
        group: what ``train_labels.csv``'s group column (``original``, ``source`` or ``group``, see
            `arena.csvfile.GROUP_COLUMNS`) says for this video, as written; None without that column or with an
            empty cell. `arena.groups` turns it into the group of videos that share a source.
    """

    key: str
    path: Path
    label: int | None
    split: Literal["train", "val", "test"] | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if not self.key or self.key.startswith("/") or ".." in PurePosixPath(self.key).parts:
            raise ValueError(f"VideoItem key must be a relative posix path inside the data folder, got {self.key!r}")
        if self.label not in (None, 0, 1):
            raise ValueError(f"VideoItem label must be 0, 1 or None, got {self.label!r} for {self.key}")
        if self.split not in (None, "train", "val", "test"):
            raise ValueError(f"VideoItem split must be train, val, test or None, got {self.split!r} for {self.key}")


@dataclass(frozen=True)
class Issue:
    """One problem found in the layout. ``kind`` groups issues in the printed report."""

    level: Literal["error", "warning"]
    kind: str
    message: str


@dataclass
class LayoutReport:
    """Everything :func:`scan_dataset` found: counts, errors and warnings. ``str(report)`` is printable."""

    root: Path
    issues: list[Issue] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def error(self, kind: str, message: str) -> None:
        self.issues.append(Issue("error", kind, message))

    def warn(self, kind: str, message: str) -> None:
        self.issues.append(Issue("warning", kind, message))

    @property
    def errors(self) -> list[str]:
        return [i.message for i in self.issues if i.level == "error"]

    @property
    def warnings(self) -> list[str]:
        return [i.message for i in self.issues if i.level == "warning"]

    @property
    def ok(self) -> bool:
        """True when nothing makes training impossible (warnings allowed)."""
        return not self.errors

    @property
    def skipped_items(self) -> list[str]:
        """Messages of the warnings that each dropped one video or CSV row (what ``counts["skipped"]`` counts)."""
        return [i.message for i in self.issues if i.kind in _SKIP_KINDS]

    def kinds(self, level: str | None = None) -> set[str]:
        """The kinds of issues found (e.g. ``{"missing", "duplicate"}``), optionally of one level."""
        return {i.kind for i in self.issues if level is None or i.level == level}

    def summary_line(self) -> str:
        c = self.counts
        return (f"{c.get('train_real', 0)} real + {c.get('train_fake', 0)} fake train videos, "
                f"{c.get('test', 0)} test videos, {c.get('skipped', 0)} skipped")

    def __str__(self) -> str:
        lines = [f"data folder {self.root}: {self.summary_line()}"]
        lines += [f"  note: {n}" for n in self.notes]
        for level in ("error", "warning"):
            items = [i for i in self.issues if i.level == level]
            if not items:
                continue
            lines.append(f"{level}s ({len(items)}):")
            by_kind: dict[str, list[Issue]] = defaultdict(list)
            for i in items:
                by_kind[i.kind].append(i)
            for kind, group in by_kind.items():
                lines.append(f"  {kind} ({len(group)}):")
                lines += [f"    - {i.message}" for i in group[:_MAX_EXAMPLES]]
                if len(group) > _MAX_EXAMPLES:
                    lines.append(f"    ... and {len(group) - _MAX_EXAMPLES} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class ListedVideo:
    """One name of ``test_public.csv`` in file order: the key it resolved to, or None and why (for the submission,
    which must keep every row). Without the CSV, one entry per test video with its file name."""

    row: int
    name: str
    key: str | None
    problem: str = ""


@dataclass
class Dataset:
    """The usable videos of a data folder (skipped ones are only in the report).

    ``test_listing`` keeps ``test_public.csv``'s order and its unusable names; ``test`` is sorted by key.
    ``group_column`` is which of ``original``/``source``/``group`` ``train_labels.csv`` has (lower case), or None;
    ``listed_names`` maps each train key to its name as written in ``train_labels.csv`` (empty without the CSV).
    ``same_content`` lists pairs of train keys whose files are byte-identical (same label: both kept, and
    `arena.groups` keeps them on one side of every split; two labels: both were skipped).
    """

    root: Path
    train: list[VideoItem]
    test: list[VideoItem]
    report: LayoutReport
    test_listing: list[ListedVideo] = field(default_factory=list)
    group_column: str | None = None
    listed_names: dict[str, str] = field(default_factory=dict)
    same_content: list[tuple[str, str]] = field(default_factory=list)

    def by_key(self) -> dict[str, VideoItem]:
        """Every train and test item by key (build it once when looking many keys up)."""
        return {item.key: item for item in (*self.train, *self.test)}

    def __repr__(self) -> str:
        return f"Dataset(root={str(self.root)!r}, train={len(self.train)}, test={len(self.test)}, ok={self.report.ok})"


# ------------------------------------------------------------------------------------------------ paths


def _inside(path: Path, real_root: Path) -> bool:
    try:
        path.resolve().relative_to(real_root)
    except ValueError:
        return False
    return True


def _is_video_name(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS)


class _Scanner:
    """Walks the folders once and resolves CSV names; fills the report."""

    def __init__(self, root: Path, report: LayoutReport) -> None:
        self.root = root
        self.real_root = root.resolve()
        self.report = report
        # key -> folder label (0/1 for train/real|fake, None elsewhere) for every acceptable video file on disk
        self.train_files: dict[str, int | None] = {}
        self.test_files: set[str] = set()
        # keys that exist but escape or are unusable -> the message already reported for them
        self.refused: dict[str, str] = {}
        self.last_problem = ""  # why resolve_name last returned None when it reported nothing new

    # -- folders
    def _entries(self, rel: str) -> list[os.DirEntry]:
        try:
            return sorted(os.scandir(self.root / rel), key=lambda e: e.name)
        except OSError as e:
            self.report.error("unreadable-folder", f"{rel}: cannot be listed ({e.strerror}); check its permissions")
            return []

    def scan_folder(self, rel: str, label: int | None, into: dict | set) -> None:
        folder = self.root / rel
        for entry in self._entries(rel):
            name = entry.name
            if name.startswith("."):
                continue
            shown = f"{rel}/{os.fsencode(name).decode('utf-8', 'backslashreplace')}"
            if not is_utf8(name):
                self.report.warn("non-utf8-name", f"{shown}: file name is not valid UTF-8; skipped (rename it)")
                self.refused[shown] = self.report.issues[-1].message
                continue
            key = f"{rel}/{name}"
            path = folder / name
            if entry.is_dir(follow_symlinks=False):
                continue
            if not _is_video_name(name):
                self.report.warn("not-a-video-name", f"{key}: extension is not one of {', '.join(VIDEO_EXTENSIONS)}; "
                                 "ignored")
                continue
            if not _inside(path, self.real_root):
                self.report.error("escapes-data-folder", f"{key}: is a symlink to {path.resolve()}, outside the data "
                                  f"folder {self.real_root}; refused (copy the file into the folder instead)")
                self.refused[key] = self.report.issues[-1].message
                continue
            if not path.exists():
                self.report.warn("broken-link", f"{key}: broken symlink; skipped")
                self.refused[key] = self.report.issues[-1].message
                continue
            if not path.is_file():  # a FIFO or device named .mp4 would block or stream forever in the decoder
                self.report.warn("not-a-file", f"{key}: not a regular file; skipped")
                self.refused[key] = self.report.issues[-1].message
                continue
            if path.stat().st_size == 0:
                self.report.warn("zero-bytes", f"{key}: file is empty (0 bytes); skipped")
                self.refused[key] = self.report.issues[-1].message
                continue
            if isinstance(into, dict):
                into[key] = label
            else:
                into.add(key)

    def train_subfolders(self) -> list[tuple[str, int | None]]:
        """``train`` itself (label None) and its real/fake subfolders (any case), as (relative dir, label)."""
        out: list[tuple[str, int | None]] = [("train", None)]
        for entry in self._entries("train"):
            if entry.is_dir() and not is_utf8(entry.name):
                shown = os.fsencode(entry.name).decode("utf-8", "backslashreplace")
                self.report.warn("non-utf8-name", f"train/{shown}: folder name is not valid UTF-8; skipped (rename it)")
            elif entry.is_dir() and entry.name.lower() in _CLASS_FOLDERS:
                rel = f"train/{entry.name}"
                if not _inside(self.root / rel, self.real_root):
                    self.report.error("escapes-data-folder", f"{rel}: points outside the data folder "
                                      f"{self.real_root}; refused")
                    continue
                out.append((rel, _CLASS_FOLDERS[entry.name.lower()]))
            elif entry.is_dir():
                self.report.warn("unknown-folder", f"train/{entry.name}: not 'real' or 'fake'; its files are only "
                                 "used when train_labels.csv lists them")
                out.append((f"train/{entry.name}", None))
        return out

    # -- CSV names
    def resolve_name(self, raw: str, where: str, search: list[str], known: set[str]) -> str | None:
        """Key for a CSV name (bare or relative), or None (reported). ``where`` names the CSV row."""
        name = raw.strip().replace("\\", "/")
        if not name:
            self.report.warn("empty-name", f"{where}: empty file name; row skipped")
            return None
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in PurePosixPath(name).parts:
            self.report.error("escapes-data-folder", f"{where}: file name {raw!r} is absolute or contains '..'; "
                              f"only names inside the data folder {self.real_root} are allowed")
            return None
        name = str(PurePosixPath(name))  # drops "./" and doubled slashes
        if "/" in name:
            candidates = [name]
        else:
            candidates = [f"{d}/{name}" for d in search]
        if not PurePosixPath(name).suffix:
            candidates += [c + ext for c in candidates for ext in VIDEO_EXTENSIONS]
        found = [c for c in candidates if c in known]
        if not found:
            refused = [c for c in candidates if c in self.refused]
            if refused:
                self.last_problem = f"{where}: {self.refused[refused[0]]}"
                return None  # already reported (escaping symlink, empty file, ...)
            for c in candidates:
                if os.path.lexists(self.root / c) and not _inside(self.root / c, self.real_root):
                    self.report.error("escapes-data-folder", f"{where}: {c} points to {(self.root / c).resolve()}, "
                                      f"outside the data folder {self.real_root}; refused")
                    return None
                if (self.root / c).is_file():
                    self.report.warn("missing", f"{where}: {c} exists but lies outside the scanned folders "
                                     f"({', '.join(search)}); skipped")
                    return None
            looked = ", ".join(candidates[:4]) + (" ..." if len(candidates) > 4 else "")
            self.report.warn("missing", f"{where}: {raw.strip()!r} listed but not found (looked for {looked}); "
                             "skipped")
            return None
        if len(found) > 1:
            return "|".join(found)  # ambiguous: the caller decides with the label
        return found[0]


def _read_csv(path: Path, report: LayoutReport, *, need_label: bool, level: str) -> CsvListing | None:
    """The rows of a CSV (`CsvListing`), or None when the file cannot be used at all (reported)."""
    listing = read_listing(path, need_label=need_label)
    if listing.note:
        report.notes.append(listing.note)
    for kind, message in listing.skipped:
        report.warn(kind, message)
    if listing.problem is not None:
        (report.error if level == "error" else report.warn)(*listing.problem)
        return None
    return listing


# ------------------------------------------------------------------------------------------------- scan


def scan_dataset(root: str | os.PathLike, *, require_test: bool = True) -> Dataset:
    """Look at a data folder and report everything found, without raising for bad content.

    Args:
        root: the data folder (seed layout, see the module docstring).
        require_test: when True, a missing ``test/`` folder or an unusable ``test_public.csv`` is an error;
            when False only a warning (training needs no test videos).

    Returns:
        A :class:`Dataset` whose ``report`` holds errors and warnings; check ``report.ok``.
    """
    root = Path(root)
    report = LayoutReport(root=root)
    if not root.is_dir():
        report.error("no-data-folder", f"{root}: not a folder (give the folder holding {TRAIN_CSV} and train/)")
        report.counts = {"train_real": 0, "train_fake": 0, "test": 0, "skipped": 0}
        return Dataset(root=root, train=[], test=[], report=report)
    scanner = _Scanner(root, report)
    train, group_column, listed_names = _scan_train(root, scanner, report)
    test, listing = _scan_test(root, scanner, report, require_test=require_test)

    train, same_content = _same_content(train, test, report)
    train_names = {PurePosixPath(i.key).name for i in train}
    for item in test:
        if PurePosixPath(item.key).name in train_names:
            report.warn("train-test-overlap", f"{item.key}: a train video has the same file name; check for leakage")
    n_real = sum(i.label == 0 for i in train)
    n_fake = sum(i.label == 1 for i in train)
    if report.errors:
        pass  # an unusable CSV or folder was reported already; the counts below would only repeat it
    elif not train:
        report.error("no-train-videos", f"{root}: no usable train videos (see the warnings for what was skipped)")
    elif n_real == 0 or n_fake == 0:
        report.error("one-class", f"{root}: train videos of one class only ({n_real} real, {n_fake} fake); "
                     "training needs both")
    skipped = len([i for i in report.issues if i.kind in _SKIP_KINDS])
    report.counts = {"train_real": n_real, "train_fake": n_fake, "test": len(test), "skipped": skipped}
    return Dataset(root=root, train=train, test=test, report=report, test_listing=listing, group_column=group_column,
                   listed_names=listed_names, same_content=same_content)


def _same_content(train: list[VideoItem], test: list[VideoItem], report: LayoutReport
                  ) -> tuple[list[VideoItem], list[tuple[str, str]]]:
    """Report videos whose bytes are identical (`arena.content`); drop train videos whose copies carry two labels.

    Returns:
        the train items kept, and the pairs of kept train keys that are one video under two names.
    """
    items = [*train, *test]
    drop: set[str] = set()
    pairs: list[tuple[str, str]] = []
    for group in identical_groups([i.path for i in items]):
        members = [items[n] for n in group]
        names = ", ".join(i.key for i in members)
        labels = {i.label for i in members if i.label is not None}
        in_train = [i for i in members if i.label is not None]
        if len(labels) > 1:
            for i in in_train:  # one warning per skipped video (the report counts them)
                drop.add(i.key)
                report.warn("same-content-conflict", f"{i.key}: the same video (identical bytes) as "
                            f"{', '.join(o.key for o in members if o is not i)}, labelled both real and fake; "
                            "skipped (fix the label or delete the copy)")
        elif len(in_train) > 1:
            pairs += [(in_train[0].key, i.key) for i in in_train[1:]]
            report.warn("same-content", f"{names}: the same video (identical bytes) under {len(members)} names; "
                        "kept, and every split keeps them on one side")
        if in_train and len(members) > len(in_train):
            report.warn("train-test-same-content", f"{names}: a test video is byte-identical to a train video "
                        f"labelled {'fake' if labels == {1} else 'real' if labels == {0} else 'both ways'}")
        elif not in_train:
            report.warn("same-content", f"{names}: the same test video (identical bytes) under {len(members)} names")
    return [i for i in train if i.key not in drop], pairs


# Warning kinds that each stand for one skipped video (or CSV row); "duplicate-row" keeps the video.
_SKIP_KINDS = {"non-utf8-name", "broken-link", "not-a-file", "zero-bytes", "missing", "unlisted", "duplicate",
               "unknown-label", "ambiguous", "empty-name", "same-content-conflict", "bad-csv-row"}


def _scan_train(root: Path, scanner: _Scanner, report: LayoutReport
                ) -> tuple[list[VideoItem], str | None, dict[str, str]]:
    """The labelled train videos, the CSV's group column (or None) and each video's name as the CSV writes it."""
    csv_path = root / TRAIN_CSV
    if (root / "train").is_dir():
        subfolders = scanner.train_subfolders()
        for rel, label in subfolders:
            scanner.scan_folder(rel, label, scanner.train_files)
    else:
        subfolders = []
        report.error("no-train-folder", f"{root / 'train'}: missing (expected train/real and train/fake)")
        return [], None, {}
    on_disk = scanner.train_files
    if not csv_path.exists():
        report.warn("missing-csv", f"{TRAIN_CSV}: missing; labels taken from the train/real and train/fake folders")
        unlabelled = sorted(k for k, lab in on_disk.items() if lab is None)
        for key in unlabelled:
            report.warn("unlisted", f"{key}: not in a real/ or fake/ folder and no {TRAIN_CSV}; skipped")
        return [VideoItem(k, (root / k).resolve(), lab) for k, lab in sorted(on_disk.items())
                if lab is not None], None, {}

    listing = _read_csv(csv_path, report, need_label=True, level="error")
    if listing is None:
        return [], None, {}
    rows = listing.rows
    search = [rel for rel, _ in subfolders]
    labels: dict[str, int] = {}
    first_row: dict[str, int] = {}
    names: dict[str, str] = {}
    conflicted: set[str] = set()
    for line_no, fname, raw_label in rows:
        where = f"{TRAIN_CSV} row {line_no}"
        label = parse_label(raw_label)
        if label is None:
            report.warn("unknown-label", f"{where}: label {raw_label!r} for {fname.strip()!r} is not 0/1/REAL/FAKE; "
                        "row skipped")
            continue
        key = scanner.resolve_name(fname, where, search, set(on_disk))
        if key is None:
            continue
        if "|" in key:  # bare name present in several folders: the label says which one
            options = key.split("|")
            matching = [k for k in options if on_disk[k] == label]
            if len(matching) != 1:
                report.warn("ambiguous", f"{where}: {fname.strip()!r} matches {', '.join(options)}; give the relative "
                            "path in the CSV; skipped")
                continue
            key = matching[0]
        if key in labels or key in conflicted:
            if key not in conflicted and labels[key] == label:
                report.warn("duplicate-row", f"{where}: {key} already listed in row {first_row[key]} (same label); "
                            "duplicate row ignored")
            else:
                report.warn("duplicate", f"{where}: {key} already listed in row {first_row[key]} with another label; "
                            "video skipped")
                labels.pop(key, None)
                conflicted.add(key)
            continue
        labels[key] = label
        first_row[key] = line_no
        names[key] = fname.strip()
    items = []
    for key, label in sorted(labels.items()):
        folder_label = on_disk[key]
        if folder_label is not None and folder_label != label:
            report.warn("label-folder-mismatch", f"{key}: {TRAIN_CSV} row {first_row[key]} says "
                        f"{'fake' if label else 'real'} but the file lies in the "
                        f"{'fake' if folder_label else 'real'} folder; the CSV label is used")
        items.append(VideoItem(key, (root / key).resolve(), label, group=listing.groups.get(first_row[key])))
    for key in sorted(set(on_disk) - set(labels) - conflicted):
        report.warn("unlisted", f"{key}: present but not listed in {TRAIN_CSV}; skipped")
    return items, listing.group_column, {k: names[k] for k in labels}


def _scan_test(root: Path, scanner: _Scanner, report: LayoutReport, *, require_test: bool
               ) -> tuple[list[VideoItem], list[ListedVideo]]:
    level = "error" if require_test else "warning"
    add = report.error if require_test else report.warn
    csv_path = root / TEST_CSV
    if not (root / "test").is_dir():
        add("no-test-folder", f"{root / 'test'}: missing; there is nothing to predict"
            + ("" if require_test else " (fine for training)"))
        return [], []
    if not _inside(root / "test", scanner.real_root):
        report.error("escapes-data-folder", f"test: points outside the data folder {scanner.real_root}; refused")
        return [], []
    scanner.scan_folder("test", None, scanner.test_files)
    if not csv_path.exists():
        report.warn("missing-csv", f"{TEST_CSV}: missing; every video in test/ is used")
        keys = sorted(scanner.test_files)
        listing = [ListedVideo(0, PurePosixPath(k).name, k) for k in keys]
        return [VideoItem(k, (root / k).resolve(), None, "test") for k in keys], listing
    csv_listing = _read_csv(csv_path, report, need_label=False, level=level)
    if csv_listing is None:
        return [], []
    rows = csv_listing.rows
    keys: dict[str, int] = {}
    listing: list[ListedVideo] = []
    names: set[str] = set()
    for line_no, fname, _ in rows:
        where = f"{TEST_CSV} row {line_no}"
        n_issues = len(report.issues)
        scanner.last_problem = ""
        key = scanner.resolve_name(fname, where, ["test"], scanner.test_files)
        if fname.strip() not in names:
            names.add(fname.strip())
            problem = "" if key else (report.issues[-1].message if len(report.issues) > n_issues
                                      else scanner.last_problem or f"{where}: video skipped (see the report)")
            listing.append(ListedVideo(line_no, fname.strip(), key, problem))
        if key is None:
            continue
        if key in keys:
            report.warn("duplicate-row", f"{where}: {key} already listed in row {keys[key]}; duplicate row ignored")
            continue
        keys[key] = line_no
    for key in sorted(scanner.test_files - set(keys)):
        report.warn("unlisted", f"{key}: present but not listed in {TEST_CSV}; skipped")
    return [VideoItem(k, (root / k).resolve(), None, "test") for k in sorted(keys)], listing


def load_dataset(root: str | os.PathLike, *, require_test: bool = True) -> Dataset:
    """Scan a data folder and raise :class:`DataError` if anything makes training impossible.

    Warnings (skipped files, mismatches) stay in ``dataset.report``; print it to show them.
    """
    dataset = scan_dataset(root, require_test=require_test)
    if not dataset.report.ok:
        errors = dataset.report.errors
        shown = "\n  - ".join(errors[:10]) + (f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else "")
        raise DataError(f"data folder {dataset.root} cannot be used ({len(errors)} error(s)):\n  - {shown}\n"
                        "Run `arena doctor --data DIR` for the full report.")
    return dataset
