"""Data layer: layout parsing, label spellings, path-escape refusal, layout report, the CSV reader.

The data layer never decodes videos, so tiny non-empty placeholder files stand in for them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _shared import make_layout

from arena.csvfile import FILENAME_COLUMNS, LABEL_COLUMNS, parse_label, read_csv_rows
from arena.data import VideoItem, load_dataset, scan_dataset
from arena.errors import DataError


def kinds(ds) -> set[str]:
    return ds.report.kinds()


# ------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("fcol", [*FILENAME_COLUMNS, "FileName", " VIDEO "])
@pytest.mark.parametrize("lcol", [*LABEL_COLUMNS, "Label", "IS_FAKE"])
def test_every_column_name_variant(tmp_path, fcol, lcol):
    csv = f"{fcol},{lcol}\nr000.mp4,0\nf000.mp4,1\n"
    ds = load_dataset(make_layout(tmp_path, 1, 1, csv=csv))
    assert [(i.key, i.label) for i in ds.train] == [("train/fake/f000.mp4", 1), ("train/real/r000.mp4", 0)]


@pytest.mark.parametrize("real,fake", [("0", "1"), ("REAL", "FAKE"), ("real", "fake"), ("Real", "Fake"),
                                       (" REAL ", " fake\t"), ('"0"', '"1"'), ("0.0", "1.0")])
def test_every_label_spelling(tmp_path, real, fake):
    csv = f"file,target\nr000.mp4,{real}\nf000.mp4,{fake}\n"
    ds = load_dataset(make_layout(tmp_path, 1, 1, csv=csv))
    assert {i.key: i.label for i in ds.train} == {"train/real/r000.mp4": 0, "train/fake/f000.mp4": 1}
    assert not ds.report.warnings or kinds(ds) <= {"missing-csv"}


def test_parse_label_values():
    assert [parse_label(v) for v in (0, 1, "0", "1", "FAKE", " real ", 1.0)] == [0, 1, 0, 1, 1, 0, 1]
    assert [parse_label(v) for v in (2, -1, "yes", "", None, 0.5)] == [None] * 6
    assert [parse_label(v) for v in (True, False, "True", " false ", "TRUE")] == [1, 0, 1, 0, 1]


def test_semicolon_csv_and_bom(tmp_path):
    csv = "\ufeffName;Class\nr000.mp4;REAL\nf000.mp4;FAKE\n"
    ds = load_dataset(make_layout(tmp_path, 1, 1, csv=csv))
    assert len(ds.train) == 2


def test_relative_and_bare_names(tmp_path):
    csv = "path,label\ntrain/real/r000.mp4,0\nf000.mp4,1\n./train/fake/f001.mp4,1\nr001,0\n"
    root = make_layout(tmp_path, 2, 2, csv=csv)
    (root / "test_public.csv").write_text("video\ntest/t000.mp4\nt001.mp4\n")
    ds = load_dataset(root)
    assert [i.key for i in ds.train] == ["train/fake/f000.mp4", "train/fake/f001.mp4", "train/real/r000.mp4",
                                         "train/real/r001.mp4"]
    assert [i.key for i in ds.test] == ["test/t000.mp4", "test/t001.mp4"]
    assert all(i.split == "test" and i.label is None for i in ds.test)
    assert all(i.path.is_absolute() and i.path.is_file() for i in ds.train + ds.test)
    assert ds.by_key()["test/t001.mp4"].path == (root / "test/t001.mp4").resolve()


def test_labels_from_folders_without_csv(tmp_path):
    ds = load_dataset(make_layout(tmp_path, 3, 2, csv=None))
    assert sorted((i.key, i.label) for i in ds.train) == [
        ("train/fake/f000.mp4", 1), ("train/fake/f001.mp4", 1),
        ("train/real/r000.mp4", 0), ("train/real/r001.mp4", 0), ("train/real/r002.mp4", 0)]
    assert "missing-csv" in ds.report.kinds("warning")
    assert ds.report.counts == {"train_real": 3, "train_fake": 2, "test": 2, "skipped": 0}


def test_video_item_validates():
    with pytest.raises(ValueError, match="label must be 0, 1 or None"):
        VideoItem("train/a.mp4", Path("/x"), 2)
    with pytest.raises(ValueError, match="relative posix path"):
        VideoItem("../a.mp4", Path("/x"), 0)


# ------------------------------------------------------------------------------------ path escapes


def test_dotdot_name_refused(tmp_path):
    root = make_layout(tmp_path / "data", 1, 1, csv="filename,label\nr000.mp4,0\nf000.mp4,1\n../secret.mp4,1\n")
    (tmp_path / "secret.mp4").write_bytes(b"x")
    with pytest.raises(DataError, match=r"train_labels.csv row 4: file name '\.\./secret\.mp4' .*contains '\.\.'"):
        load_dataset(root)


def test_absolute_name_refused(tmp_path):
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"x")
    root = make_layout(tmp_path / "data", 1, 1, csv=f"filename,label\nr000.mp4,0\nf000.mp4,1\n{outside},1\n")
    with pytest.raises(DataError, match="row 4: file name .*secret.mp4' is absolute"):
        load_dataset(root)
    (root / "train_labels.csv").write_text("filename,label\nr000.mp4,0\nf000.mp4,1\n")
    (root / "test_public.csv").write_text("filename\nC:\\videos\\t000.mp4\n")
    with pytest.raises(DataError, match="test_public.csv row 2.*is absolute"):
        load_dataset(root)


def test_symlink_outside_refused(tmp_path):
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"x")
    root = make_layout(tmp_path / "data", 1, 1, csv="filename,label\nr000.mp4,0\nf000.mp4,1\nevil.mp4,1\n")
    os.symlink(outside, root / "train/fake/evil.mp4")
    with pytest.raises(DataError, match=r"train/fake/evil.mp4: is a symlink to .*secret.mp4, outside the data folder"):
        load_dataset(root)
    # also without a CSV (folder labels) and for a symlinked folder
    (root / "train_labels.csv").unlink()
    with pytest.raises(DataError, match="evil.mp4: is a symlink"):
        load_dataset(root)
    (root / "train/fake/evil.mp4").unlink()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/x.mp4").write_bytes(b"x")
    os.symlink(tmp_path / "elsewhere", root / "train/Fake2")
    with pytest.raises(DataError, match="Fake2/x.mp4: is a symlink to .*elsewhere/x.mp4, outside"):
        load_dataset(root)


def test_symlink_inside_allowed(tmp_path):
    root = make_layout(tmp_path, 1, 1, csv=None)
    (root / "store").mkdir()
    (root / "store/v.mp4").write_bytes(b"x")
    os.symlink(root / "store/v.mp4", root / "train/fake/link.mp4")
    ds = load_dataset(root)
    assert ds.by_key()["train/fake/link.mp4"].path == (root / "store/v.mp4").resolve()


# -------------------------------------------------------------------------------------- the report


def test_missing_unlisted_duplicate_mismatch_unknown(tmp_path):
    csv = ("filename,label\n"
           "r000.mp4,0\n"
           "r001.mp4,0\n"
           "r001.mp4,0\n"          # duplicate row, same label: ignored
           "f000.mp4,1\n"
           "f000.mp4,0\n"          # duplicate with another label: video skipped
           "f001.mp4,1\n"
           "gone.mp4,1\n"          # listed but missing
           "r002.mp4,FAKE\n"       # label disagrees with folder: CSV wins, warned
           "f002.mp4,2\n")         # unknown label: row skipped
    root = make_layout(tmp_path, 4, 3, csv=csv)  # r003 present but unlisted
    ds = load_dataset(root)
    labels = {i.key: i.label for i in ds.train}
    assert labels == {"train/real/r000.mp4": 0, "train/real/r001.mp4": 0, "train/fake/f001.mp4": 1,
                      "train/real/r002.mp4": 1}
    rep = ds.report
    assert rep.kinds("warning") >= {"duplicate-row", "duplicate", "missing", "label-folder-mismatch",
                                    "unknown-label", "unlisted"}
    text = str(rep)
    assert "row 4: train/real/r001.mp4 already listed in row 3 (same label)" in text
    assert "row 6: train/fake/f000.mp4 already listed in row 5 with another label" in text
    assert "row 8: 'gone.mp4' listed but not found" in text
    assert "train/real/r002.mp4: train_labels.csv row 9 says fake but the file lies in the real folder" in text
    assert "row 10: label '2' for 'f002.mp4' is not 0/1/REAL/FAKE" in text
    assert "train/real/r003.mp4: present but not listed" in text
    assert "train/fake/f002.mp4: present but not listed" in text
    assert rep.ok and rep.counts["train_real"] == 2 and rep.counts["train_fake"] == 2


def test_empty_and_missing_csvs(tmp_path):
    root = make_layout(tmp_path, 1, 1, csv="")
    with pytest.raises(DataError, match="train_labels.csv: file is empty .*delete it to take labels from"):
        load_dataset(root)
    (root / "train_labels.csv").write_text("filename,label\n")
    with pytest.raises(DataError, match="train_labels.csv: header only, no rows"):
        load_dataset(root)
    (root / "train_labels.csv").unlink()
    (root / "test_public.csv").write_text("")
    with pytest.raises(DataError, match="test_public.csv: file is empty"):
        load_dataset(root)
    ds = load_dataset(root, require_test=False)  # training does not need the test CSV
    assert "empty-csv" in ds.report.kinds("warning") and len(ds.train) == 2
    (root / "test_public.csv").unlink()
    ds = load_dataset(root)
    assert [i.key for i in ds.test] == ["test/t000.mp4", "test/t001.mp4"]
    assert "test_public.csv: missing; every video in test/ is used" in str(ds.report)


def test_wrong_columns_lists_found_and_accepted(tmp_path):
    root = make_layout(tmp_path, 1, 1, csv="clip_id,y\nr000.mp4,0\n")
    with pytest.raises(DataError, match=r"no file-name column \(accepted: filename, file, video, name, path\) and "
                                        r"no label column \(accepted: label, target, class, is_fake\).*"
                                        r"columns found: 'clip_id', 'y'"):
        load_dataset(root)
    (root / "train_labels.csv").write_text("filename,score\nr000.mp4,0\n")
    with pytest.raises(DataError, match="no label column .*columns found: 'filename', 'score'"):
        load_dataset(root)


def test_zero_byte_and_non_video_files_skipped(tmp_path):
    root = make_layout(tmp_path, 2, 2, csv=None)
    (root / "train/real/r001.mp4").write_bytes(b"")
    (root / "train/fake/notes.txt").write_text("hello")
    (root / "train/fake/.DS_Store").write_bytes(b"x")
    ds = load_dataset(root)
    assert "train/real/r001.mp4" not in {i.key for i in ds.train}
    assert "train/real/r001.mp4: file is empty (0 bytes); skipped" in ds.report.warnings
    assert "not-a-video-name" in ds.report.kinds() and ds.report.counts["skipped"] == 1
    assert ".DS_Store" not in str(ds.report)


def test_non_utf8_names(tmp_path):
    root = make_layout(tmp_path, 1, 1, csv=None)
    bad = os.path.join(os.fsencode(root / "train/fake"), b"caf\xe9.mp4")
    try:
        with open(bad, "wb") as f:
            f.write(b"x")
    except OSError:
        pytest.skip("file system refuses non-UTF-8 names")
    ds = load_dataset(root)
    assert len(ds.train) == 2
    assert any("train/fake/caf\\xe9.mp4: file name is not valid UTF-8" in w for w in ds.report.warnings)
    # and a latin-1 CSV row: that row skipped, the others used
    (root / "train_labels.csv").write_bytes(b"filename,label\nr000.mp4,0\nf000.mp4,1\ncaf\xe9.mp4,1\n")
    ds = load_dataset(root)
    assert len(ds.train) == 2
    assert any("row 4: file name 'caf\\\\xe9.mp4' is not valid UTF-8" in w for w in ds.report.warnings)


def test_no_test_folder(tmp_path):
    root = make_layout(tmp_path, 1, 1, 0, test_csv=False)
    (root / "test").rmdir()
    with pytest.raises(DataError, match="test: missing; there is nothing to predict"):
        load_dataset(root)
    ds = load_dataset(root, require_test=False)
    assert ds.test == [] and "no-test-folder" in ds.report.kinds("warning")


def test_training_impossible(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        load_dataset(tmp_path / "nope")
    root = make_layout(tmp_path / "one", 2, 0, csv=None)
    with pytest.raises(DataError, match=r"one class only \(2 real, 0 fake\)"):
        load_dataset(root)
    root = make_layout(tmp_path / "none", 0, 0, csv=None)
    with pytest.raises(DataError, match="no usable train videos"):
        load_dataset(root)


def test_ambiguous_bare_name_resolved_by_label(tmp_path):
    root = make_layout(tmp_path, 1, 1, csv="filename,label\nsame.mp4,1\nr000.mp4,0\n")
    (root / "train/real/same.mp4").write_bytes(b"x")
    (root / "train/fake/same.mp4").write_bytes(b"x")
    ds = load_dataset(root)
    assert ds.by_key()["train/fake/same.mp4"].label == 1
    assert "train/real/same.mp4: present but not listed" in str(ds.report)


def test_scan_reports_errors_without_raising(tmp_path):
    root = make_layout(tmp_path, 1, 1, csv="clip,y\nr000.mp4,0\n")
    ds = scan_dataset(root)
    assert not ds.report.ok and "wrong-columns" in ds.report.kinds("error")
    assert "errors (1):" in str(ds.report) and "columns found: 'clip', 'y'" in str(ds.report)


def test_unreadable_folder_is_an_error_not_a_crash(tmp_path, monkeypatch):
    root = make_layout(tmp_path, 1, 1, csv=None)
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("train/fake"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    ds = scan_dataset(root)
    assert "train/fake: cannot be listed (Permission denied)" in ds.report.errors[0]


def test_test_folder_symlink_outside_refused(tmp_path):
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"x")
    root = make_layout(tmp_path / "data", 1, 1, 1, test_csv=False)
    os.symlink(outside, root / "test/evil.mp4")
    with pytest.raises(DataError, match="test/evil.mp4: is a symlink to .*secret.mp4, outside the data folder"):
        load_dataset(root)


def test_by_key(tmp_path):
    ds = load_dataset(make_layout(tmp_path, 1, 1, 1))
    assert sorted(ds.by_key()) == ["test/t000.mp4", "train/fake/f000.mp4", "train/real/r000.mp4"]
    assert ds.by_key()["train/fake/f000.mp4"].label == 1 and ds.by_key()["test/t000.mp4"].split == "test"


def test_fifo_named_mp4_skipped(tmp_path):
    root = make_layout(tmp_path, 2, 1, csv=None)
    os.mkfifo(root / "train/real/pipe.mp4")
    ds = load_dataset(root)
    assert "train/real/pipe.mp4: not a regular file; skipped" in ds.report.warnings
    assert ds.report.counts["train_real"] == 2


def test_test_listing_keeps_csv_order_and_unusable_names(tmp_path):
    root = make_layout(tmp_path, 1, 1, 3)
    (root / "test/t001.mp4").write_bytes(b"")  # zero bytes: skipped, but its row stays in the listing
    (root / "test_public.csv").write_text("filename\nt002.mp4\nt001.mp4\ngone.mp4\nt000.mp4\nt002.mp4\n")
    ds = load_dataset(root)
    assert [(v.row, v.name, v.key) for v in ds.test_listing] == [
        (2, "t002.mp4", "test/t002.mp4"), (3, "t001.mp4", None), (4, "gone.mp4", None),
        (5, "t000.mp4", "test/t000.mp4")]
    assert ds.test_listing[1].problem == "test_public.csv row 3: test/t001.mp4: file is empty (0 bytes); skipped"
    assert "row 4: 'gone.mp4' listed but not found" in ds.test_listing[2].problem
    assert [i.key for i in ds.test] == ["test/t000.mp4", "test/t002.mp4"]
    (root / "test_public.csv").unlink()
    ds = load_dataset(root)
    assert [(v.name, v.key) for v in ds.test_listing] == [("t000.mp4", "test/t000.mp4"), ("t002.mp4", "test/t002.mp4")]


def test_read_csv_rows(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("Video;Target\na.mp4;FAKE\n\nb.mp4;0\n")
    assert read_csv_rows(f, need_label=True) == [(2, "a.mp4", "FAKE"), (4, "b.mp4", "0")]
    f.write_text("file\na.mp4\n")
    assert read_csv_rows(f) == [(2, "a.mp4", None)]
    with pytest.raises(DataError, match="nope.csv: CSV file not found"):
        read_csv_rows(tmp_path / "nope.csv")
    f.write_text("x,y\n1,2\n")
    with pytest.raises(DataError, match="labels.csv: cannot be used: .*columns found: 'x', 'y'"):
        read_csv_rows(f)


# ------------------------------------------------------------------------------------------ group column


@pytest.mark.parametrize("gcol", ["original", "Source", " GROUP "])
def test_group_column_is_read_per_video(tmp_path, gcol):
    """The optional group column (any case) lands on each VideoItem as written; an empty cell gives None."""
    csv = f"filename,label,{gcol}\nr000.mp4,0,\nf000.mp4,1, r000.mp4 \nf001.mp4,1\n"
    ds = load_dataset(make_layout(tmp_path, 1, 2, csv=csv))
    assert ds.group_column == gcol.strip().lower()
    assert {i.key: i.group for i in ds.train} == {"train/real/r000.mp4": None, "train/fake/f000.mp4": "r000.mp4",
                                                   "train/fake/f001.mp4": None}
    assert ds.listed_names == {"train/real/r000.mp4": "r000.mp4", "train/fake/f000.mp4": "f000.mp4",
                               "train/fake/f001.mp4": "f001.mp4"}
    assert any(f"groups from column {gcol!r}" in n for n in ds.report.notes)


def test_no_group_column_and_no_csv(tmp_path):
    ds = load_dataset(make_layout(tmp_path / "a", 1, 1))
    assert ds.group_column is None and {i.group for i in ds.train} == {None}
    ds = load_dataset(make_layout(tmp_path / "b", 1, 1, csv=None))
    assert ds.group_column is None and ds.listed_names == {}
