"""The stratified train/validation split: scikit-learn's numbers, the split file, its reuse and its refusals."""

from __future__ import annotations

import json

import pytest
from _shared import make_layout
from sklearn.model_selection import train_test_split

from arena.data import load_dataset
from arena.errors import DataError
from arena.split import SPLIT_FILE, load_split, make_split


def test_split_stratified_420_180_and_reused(tmp_path):
    ds = load_dataset(make_layout(tmp_path / "data", 300, 300, 0, csv=None, test_csv=False), require_test=False)
    out = tmp_path / "out"
    split = make_split(ds, out, seed=42)
    assert (len(split.train), len(split.val)) == (420, 180)
    assert split.counts() == {"train_real": 210, "train_fake": 210, "val_real": 90, "val_fake": 90}
    assert {i.split for i in split.train} == {"train"} and {i.split for i in split.val} == {"val"}
    assert not {i.key for i in split.train} & {i.key for i in split.val}
    doc = json.loads(split.path.read_text())
    assert doc["seed"] == 42 and doc["val_fraction"] == 0.3 and len(doc["train"]) == 420

    again = make_split(load_dataset(tmp_path / "data", require_test=False), out, seed=42)
    assert again.sha256 == split.sha256 and again.train == split.train and again.val == split.val
    assert load_split(ds, out).sha256 == split.sha256
    # the same seed regenerates the same file; another seed gives another split
    assert make_split(ds, tmp_path / "other", seed=42).sha256 == split.sha256
    assert make_split(ds, tmp_path / "third", seed=7).sha256 != split.sha256


def test_split_refuses_mismatch(tmp_path):
    root = make_layout(tmp_path / "data", 5, 5, csv=None)
    out = tmp_path / "out"
    split = make_split(load_dataset(root), out)
    # scikit-learn: ceil(0.3 * 10) = 3 validation videos, stratified as 2 + 1 (the seed's numbers, not round-half-up)
    assert (len(split.train), len(split.val)) == (7, 3)
    assert sorted(split.counts().values()) == [1, 2, 3, 4]
    gone = split.val[0].key
    (root / gone).unlink()
    with pytest.raises(DataError, match=rf"no longer matches.*1 video\(s\) in the split but no longer in the dataset "
                                        rf"\(e.g. {gone}\).*delete .*split.json \(or pass --new-split\).*"
                                        r"cached features stay valid.*rerun tune-head, frame-test and train-full"):
        load_split(load_dataset(root), out)
    (root / gone).write_bytes(b"x")
    (root / "train/real/extra.mp4").write_bytes(b"x")
    with pytest.raises(DataError, match=r"1 video\(s\) in the dataset but not in the split"):
        make_split(load_dataset(root), out)
    fresh = make_split(load_dataset(root), out, new=True)
    assert len(fresh.train) + len(fresh.val) == 11
    with pytest.raises(DataError, match="made with seed=42.*but seed=3, val_fraction=0.3 was asked"):
        make_split(load_dataset(root), out, seed=3)


def test_split_bad_inputs(tmp_path):
    ds = load_dataset(make_layout(tmp_path / "data", 1, 3, csv=None))
    with pytest.raises(DataError, match="1 real train video.*at least 2"):
        make_split(ds, tmp_path / "out")
    with pytest.raises(DataError, match="val_fraction must be between 0 and 1.*got 1.5"):
        make_split(ds, tmp_path / "out", val_fraction=1.5)
    with pytest.raises(DataError, match="no split file at .*arena split --data"):
        load_split(ds, tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/split.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid split file"):
        load_split(ds, tmp_path / "bad")


def test_split_is_sklearns_stratified_train_test_split(tmp_path):
    """The seed's split: train_test_split(keys, test_size=0.3, stratify=labels, random_state=seed) on sorted keys."""
    ds = load_dataset(make_layout(tmp_path / "data", 13, 8, 0, csv=None, test_csv=False), require_test=False)
    split = make_split(ds, tmp_path / "out", seed=5)
    items = sorted(ds.train, key=lambda i: i.key)
    want_train, want_val = train_test_split([i.key for i in items], test_size=0.3,
                                            stratify=[i.label for i in items], random_state=5)
    assert [i.key for i in split.train] == sorted(want_train)
    assert [i.key for i in split.val] == sorted(want_val)
    assert split.path.name == SPLIT_FILE
    c = split.counts()
    assert (c["val_real"], c["val_fake"]) == (4, 3) and (c["train_real"], c["train_fake"]) == (9, 5)


def test_split_fraction_too_small_for_both_classes(tmp_path):
    ds = load_dataset(make_layout(tmp_path / "data", 3, 3, 0, csv=None, test_csv=False), require_test=False)
    with pytest.raises(DataError, match=r"cannot split 6 videos with val_fraction=0.1.*at least one video of each"):
        make_split(ds, tmp_path / "out", val_fraction=0.1)
