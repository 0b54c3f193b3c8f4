"""Reading the data folder's CSV lists (``train_labels.csv``, ``test_public.csv``) and their label spellings.

Column names vary between datasets, so the file-name, label and optional group columns are found by name
(case-insensitive, see `FILENAME_COLUMNS` / `LABEL_COLUMNS` / `GROUP_COLUMNS`); the delimiter is sniffed, Excel's
BOM is ignored, and a row whose name is not valid UTF-8 is skipped on its own instead of failing the file.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from arena.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["FILENAME_COLUMNS", "GROUP_COLUMNS", "LABEL_COLUMNS", "CsvListing", "is_utf8", "parse_label",
           "read_csv_rows", "read_listing"]

FILENAME_COLUMNS = ("filename", "file", "video", "name", "path")
LABEL_COLUMNS = ("label", "target", "class", "is_fake")
#: Which videos share a source (`arena.groups`): ``original``/``source`` name the video a fake was made from (as
#: DFDC's metadata does), ``group`` is any id; the first of these present is used.
GROUP_COLUMNS = ("original", "source", "group")
# "True"/"False" is how pandas writes a boolean column (``is_fake``, or a ``label`` made with ``df.label == "FAKE"``):
# True is 1, fake, as everywhere else here.
_LABEL_WORDS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "real": 0, "fake": 1, "false": 0, "true": 1}

Row = tuple[int, str, "str | None"]  # (line number, file name, raw label or None)


def parse_label(value: object) -> int | None:
    """0/1 from ``0``, ``1``, ``"0"``, ``" FAKE "``, ``"real"``, ``"True"``, ``False`` ...; None for anything else."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value) if value in (0, 1) else None
    if isinstance(value, (float, np.floating)):
        return int(value) if value in (0.0, 1.0) else None
    if isinstance(value, str):
        return _LABEL_WORDS.get(value.strip().lower())
    return None


def is_utf8(name: str) -> bool:
    """False for names holding lone surrogates (undecodable bytes): they cannot become cache keys."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class CsvListing:
    """What `read_listing` found in one CSV.

    Attributes:
        rows: ``(line number, file name, raw label or None)`` of every usable row, in file order.
        problem: ``(kind, message)`` when the file cannot be used at all (then ``rows`` is empty), else None.
        skipped: ``(kind, message)`` per row skipped on its own (a name that is not valid UTF-8).
        note: which columns were used, when they were found.
        group_column: which of `GROUP_COLUMNS` the file has (lower case), or None.
        groups: that column's non-empty cells (stripped) by line number.
    """

    rows: list[Row] = field(default_factory=list)
    problem: tuple[str, str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    note: str = ""
    group_column: str | None = None
    groups: dict[int, str] = field(default_factory=dict)


def read_listing(path: Path, *, need_label: bool) -> CsvListing:
    """Read the rows of a CSV list; ``need_label`` also requires a label column. Never raises for bad content."""
    hint = "; delete it to take labels from train/real and train/fake" if need_label else ""
    try:
        raw = path.read_bytes()
    except OSError as e:
        return CsvListing(problem=("unreadable-csv", f"{path.name}: cannot be read ({e})"))
    # utf-8-sig: the BOM Excel writes is not part of the first column name. Undecodable bytes become lone
    # surrogates so that one bad name skips one row, not the whole file.
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    if not text.strip():
        return CsvListing(problem=("empty-csv", f"{path.name}: file is empty (no header, no rows){hint}"))
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    try:
        header = next(reader)
    except csv.Error as e:
        return CsvListing(problem=("unreadable-csv", f"{path.name}: the header line cannot be parsed ({e}){hint}"))
    lowered = [h.strip().lower() for h in header]
    fcol = next((lowered.index(c) for c in FILENAME_COLUMNS if c in lowered), None)
    lcol = next((lowered.index(c) for c in LABEL_COLUMNS if c in lowered), None)
    gcol = next((lowered.index(c) for c in GROUP_COLUMNS if c in lowered), None)
    problems = []
    if fcol is None:
        problems.append(f"no file-name column (accepted: {', '.join(FILENAME_COLUMNS)})")
    if need_label and lcol is None:
        problems.append(f"no label column (accepted: {', '.join(LABEL_COLUMNS)})")
    if problems:
        return CsvListing(problem=("wrong-columns", f"{path.name}: {' and '.join(problems)}, case-insensitive; "
                                   f"columns found: {', '.join(repr(h) for h in header) or 'none'}"))
    out = CsvListing(note=f"{path.name}: file names from column {header[fcol]!r}"
                     + (f", labels from column {header[lcol]!r}" if need_label else "")
                     + (f", groups from column {header[gcol]!r}" if gcol is not None else ""),
                     group_column=None if gcol is None else lowered[gcol])
    for line_no, row in _rows(reader, path.name, out.skipped):
        if not any(cell.strip() for cell in row):
            continue
        fname = row[fcol] if fcol < len(row) else ""
        label = row[lcol] if (lcol is not None and lcol < len(row)) else None
        if not is_utf8(fname):
            shown = fname.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            out.skipped.append(("non-utf8-name", f"{path.name} row {line_no}: file name {shown!r} is not valid "
                                "UTF-8; row skipped (save the CSV as UTF-8)"))
            continue
        out.rows.append((line_no, fname, label))
        group = row[gcol].strip() if (gcol is not None and gcol < len(row)) else ""
        if group:
            out.groups[line_no] = group
    if not out.rows:
        out.problem = ("empty-csv", f"{path.name}: header only, no rows{hint}")
    return out


def _rows(reader: Iterator[list[str]], name: str, skipped: list[tuple[str, str]]) -> Iterator[tuple[int, list[str]]]:
    """``(line number, cells)`` of every data row; a row the csv module refuses (a cell over its field size limit,
    131,072 characters: usually a quote left open, which swallows the lines after it) is skipped on its own with
    its line named, and reading goes on after it."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            skipped.append(("bad-csv-row", f"{name} line {reader.line_num}: cannot be parsed ({e}; a quote left "
                            "open?); row skipped"))
            continue
        yield reader.line_num, row


def read_csv_rows(path: str | os.PathLike, *, need_label: bool = False) -> list[Row]:
    """Rows ``(line number, file name, raw label or None)`` of a CSV with the accepted column names.

    The same reader the layout scan uses (column detection, BOM, delimiter sniffing, non-UTF-8 rows skipped).

    Raises:
        DataError: the file is missing, empty, or lacks the needed columns (the message lists those found).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    listing = read_listing(path, need_label=need_label)
    if listing.problem is not None:
        raise DataError(f"{path}: cannot be used: {listing.problem[1]}")
    for _, message in listing.skipped:  # skipped rows are rare; log them rather than lose them silently
        log.warning(message)
    return listing.rows
