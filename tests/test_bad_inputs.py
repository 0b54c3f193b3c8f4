"""Leftover bad inputs (issue 17, item 8): an over-long CSV field, True/False labels, one video under two names."""

from __future__ import annotations

from _shared import make_layout

from arena.content import MIN_BYTES, identical_groups
from arena.data import load_dataset, scan_dataset
from arena.groups import find_groups


def _video_bytes(seed: int, size: int = 4 * MIN_BYTES) -> bytes:
    return bytes((seed * 31 + n * 7) % 251 for n in range(size))


def _fill(root, mapping: dict[str, bytes]) -> None:
    for rel, data in mapping.items():
        (root / rel).write_bytes(data)


def test_csv_field_over_the_csv_limit_costs_only_its_row(tmp_path):
    huge = "x" * 200_000
    csv = f'filename,label\nr000.mp4,0\nr001.mp4,"{huge}"\nf000.mp4,1\nf001.mp4,1\nr002.mp4,0\n'
    ds = scan_dataset(make_layout(tmp_path, 3, 2, csv=csv))
    assert {i.key for i in ds.train} == {"train/real/r000.mp4", "train/real/r002.mp4", "train/fake/f000.mp4",
                                         "train/fake/f001.mp4"}
    text = str(ds.report)
    assert "train_labels.csv line 3: cannot be parsed (field larger than field limit (131072)" in text
    assert "bad-csv-row" in ds.report.kinds("warning")
    assert ds.report.counts["skipped"] >= 1


def test_csv_header_over_the_limit_is_a_clear_error(tmp_path):
    csv = '"' + "y" * 200_000 + '",label\nr000.mp4,0\n'
    ds = scan_dataset(make_layout(tmp_path, 1, 1, csv=csv))
    assert not ds.report.ok
    assert any("train_labels.csv: the header line cannot be parsed" in e for e in ds.report.errors)


def test_true_false_labels_are_read_as_fake_real(tmp_path):
    csv = "filename,is_fake\nr000.mp4,False\nf000.mp4,True\nr001.mp4,false\nf001.mp4,TRUE\n"
    ds = load_dataset(make_layout(tmp_path, 2, 2, csv=csv))
    assert {i.key: i.label for i in ds.train} == {"train/real/r000.mp4": 0, "train/fake/f000.mp4": 1,
                                                  "train/real/r001.mp4": 0, "train/fake/f001.mp4": 1}
    assert "unknown-label" not in ds.report.kinds()


def test_identical_groups_hashes_only_equal_sizes(tmp_path):
    a, b, c, d = (tmp_path / n for n in "abcd")
    a.write_bytes(_video_bytes(1))
    b.write_bytes(_video_bytes(1))
    c.write_bytes(_video_bytes(2))  # same size, other bytes
    d.write_bytes(b"\x00")  # placeholder: too small to be a video
    (tmp_path / "e").write_bytes(b"\x00")
    assert identical_groups([a, c, b, d, tmp_path / "e", tmp_path / "missing"]) == [[0, 2]]


def test_same_video_under_two_names_same_label_is_kept_and_grouped(tmp_path):
    root = make_layout(tmp_path, 3, 3)
    _fill(root, {"train/real/r000.mp4": _video_bytes(1), "train/real/r001.mp4": _video_bytes(1),
                 "train/fake/f000.mp4": _video_bytes(2)})
    ds = load_dataset(root)
    assert len(ds.train) == 6
    assert ds.same_content == [("train/real/r000.mp4", "train/real/r001.mp4")]
    assert "same-content" in ds.report.kinds("warning")
    groups = find_groups(ds, "auto")  # no column: detection (placeholders give no thumbnail) + identical files
    assert groups.group["train/real/r001.mp4"] == groups.group["train/real/r000.mp4"]
    assert any(p.origin == "content" for p in groups.pairs)
    assert "identical files" in groups.source


def test_same_video_with_two_labels_is_skipped_with_both_names(tmp_path):
    root = make_layout(tmp_path, 3, 3)
    _fill(root, {"train/real/r000.mp4": _video_bytes(5), "train/fake/f000.mp4": _video_bytes(5)})
    ds = load_dataset(root)
    keys = {i.key for i in ds.train}
    assert "train/real/r000.mp4" not in keys and "train/fake/f000.mp4" not in keys and len(keys) == 4
    text = str(ds.report)
    assert "train/real/r000.mp4: the same video (identical bytes) as train/fake/f000.mp4" in text
    assert ds.report.counts["skipped"] == 2


def test_test_video_identical_to_a_train_video_is_reported(tmp_path):
    root = make_layout(tmp_path, 2, 2, n_test=2)
    _fill(root, {"train/fake/f001.mp4": _video_bytes(9), "test/t001.mp4": _video_bytes(9)})
    ds = load_dataset(root)
    assert len(ds.train) == 4 and len(ds.test) == 2  # nothing lost
    assert any("test video is byte-identical to a train video labelled fake" in w for w in ds.report.warnings)
