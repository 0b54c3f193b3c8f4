"""The stratified, grouped train/validation split and K folds: scikit-learn's numbers, the split file, its reuse,
its refusals, and the `arena split` command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from _shared import make_layout
from click.testing import CliRunner
from sklearn.model_selection import train_test_split

from arena.cli import main
from arena.data import load_dataset
from arena.errors import DataError, OptionError
from arena.split import SPLIT_FILE, Split, ensure_split, load_split, make_split, stored_parts


def test_split_stratified_420_180_and_reused(tmp_path):
    ds = load_dataset(make_layout(tmp_path / "data", 300, 300, 0, csv=None, test_csv=False), require_test=False)
    out = tmp_path / "out"
    split = make_split(ds, out, seed=42, groups="none")
    assert (len(split.train), len(split.val)) == (420, 180)
    assert split.counts() == {"train_real": 210, "train_fake": 210, "val_real": 90, "val_fake": 90}
    assert {i.split for i in split.train} == {"train"} and {i.split for i in split.val} == {"val"}
    assert not {i.key for i in split.train} & {i.key for i in split.val}
    doc = json.loads(split.path.read_text())
    assert doc["seed"] == 42 and doc["val_fraction"] == 0.3 and len(doc["train"]) == 420

    again = make_split(load_dataset(tmp_path / "data", require_test=False), out, seed=42, groups="none")
    assert again.sha256 == split.sha256 and again.train == split.train and again.val == split.val
    assert load_split(ds, out).sha256 == split.sha256
    # the same seed regenerates the same file; another seed gives another split
    assert make_split(ds, tmp_path / "other", seed=42, groups="none").sha256 == split.sha256
    assert make_split(ds, tmp_path / "third", seed=7, groups="none").sha256 != split.sha256


def test_split_refuses_mismatch(tmp_path):
    root = make_layout(tmp_path / "data", 5, 5, csv=None)
    out = tmp_path / "out"
    split = make_split(load_dataset(root), out, groups="none")
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
        make_split(load_dataset(root), out, groups="none")
    fresh = make_split(load_dataset(root), out, new=True, groups="none")
    assert len(fresh.train) + len(fresh.val) == 11
    with pytest.raises(DataError, match="made with seed=42, val_fraction=0.3, groups=none, but seed=3, "
                                        "val_fraction=0.3, groups=none was asked"):
        make_split(load_dataset(root), out, seed=3, groups="none")
    with pytest.raises(DataError, match="made with seed=42, val_fraction=0.3, groups=none, but seed=42, folds=2, "
                                        "groups=none was asked"):
        make_split(load_dataset(root), out, folds=2, groups="none")


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
    split = make_split(ds, tmp_path / "out", seed=5)  # auto: placeholders give no thumbnails, so no groups
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
        make_split(ds, tmp_path / "out", val_fraction=0.1, groups="none")


# ------------------------------------------------------------------------------------------ groups and folds


def paired_layout(root: Path, n_pairs: int, n_alone: int = 0) -> Path:
    """Placeholders whose CSV names each fake's source (fake i from real i), plus ``n_alone`` lone videos per
    class; a `group` column would do the same (tests/test_groups.py)."""
    n = n_pairs + n_alone
    rows = [f"r{i:03d}.mp4,0," for i in range(n)]
    rows += [f"f{i:03d}.mp4,1,{f'r{i:03d}.mp4' if i < n_pairs else ''}" for i in range(n)]
    return make_layout(root, n, n, 0, csv="filename,label,original\n" + "\n".join(rows) + "\n", test_csv=False)


def _pairs_apart(split: Split) -> int:
    part = {i.key: "train" for i in split.train} | {i.key: "val" for i in split.val}
    return sum(part[a] != part[b] for a, b in split.pairs)


def test_grouped_holdout_keeps_pairs_together_and_stratified(tmp_path):
    ds = load_dataset(paired_layout(tmp_path / "data", 40, 5), require_test=False)
    split = make_split(ds, tmp_path / "out", seed=3)  # auto -> the `original` column
    assert split.groups == "auto" and "column 'original'" in split.group_source and len(split.pairs) == 40
    assert _pairs_apart(split) == 0
    c = split.counts()  # 3 of 10 grouped folds, 30 %, each class as close to 30 % of it (13.5) as groups allow
    assert (c["val_real"], c["val_fake"]) in {(13, 14), (14, 13)} and len(split.train) == 63
    # the seed's ungrouped split of the same data puts pairs on both sides: the leak groups close
    ungrouped = make_split(ds, tmp_path / "none", seed=3, groups="none")
    assert ungrouped.pairs == [] and (len(ungrouped.train), len(ungrouped.val)) == (63, 27)
    assert _pairs_apart(dataclasses.replace(ungrouped, pairs=split.pairs)) > 5


def test_k_folds_are_disjoint_covering_grouped_and_stratified(tmp_path):
    ds = load_dataset(paired_layout(tmp_path / "data", 20, 5), require_test=False)
    split = make_split(ds, tmp_path / "out", folds=5, seed=1, groups="column")
    assert split.folds == 5 and split.val_fraction is None and split.fold_index == 0
    keys = sorted(i.key for i in ds.train)
    vals = [sorted(i.key for i in split.fold(f).val) for f in range(5)]
    assert sorted(k for v in vals for k in v) == keys  # every video validated exactly once
    for f in range(5):
        fold = split.fold(f)
        assert fold.fold_index == f and {i.split for i in fold.val} == {"val"}
        assert sorted(i.key for i in fold.train + fold.val) == keys and not {i.key for i in fold.train} & set(vals[f])
        assert _pairs_apart(fold) == 0
        assert fold.counts()["val_real"] == fold.counts()["val_fake"] == 5
    assert split.fold(0) is split and split.train == load_split(ds, tmp_path / "out").train
    assert split.fold_counts()[2] == split.fold(2).counts()
    doc = json.loads(split.path.read_text())
    assert doc["folds"] == 5 and doc["groups"] == "column" and sorted(doc["fold"]) == keys
    assert {k for k, f in doc["fold"].items() if f == 0} == set(doc["val"])
    with pytest.raises(OptionError, match=r"fold 5 does not exist: .*split.json has 5 fold\(s\), numbered 0 to 4"):
        split.fold(5)
    with pytest.raises(DataError, match="cannot cut 8 videos in 4 groups into 5 stratified grouped folds.*fewer "
                                        "folds"):
        make_split(load_dataset(paired_layout(tmp_path / "small", 4), require_test=False), tmp_path / "s", folds=5)


def test_same_data_and_seed_same_bytes(tmp_path):
    ds = load_dataset(paired_layout(tmp_path / "data", 12, 3), require_test=False)
    for folds in (1, 3):
        a = make_split(ds, tmp_path / f"a{folds}", folds=folds, seed=9)
        b = make_split(load_dataset(tmp_path / "data", require_test=False), tmp_path / f"b{folds}", folds=folds,
                       seed=9)
        assert a.path.read_bytes() == b.path.read_bytes()
        assert make_split(ds, tmp_path / f"c{folds}", folds=folds, seed=10).sha256 != a.sha256


def test_split_file_from_before_groups_still_loads(tmp_path):
    """A v1 split.json (no groups, no folds) loads as groups none, one fold, and is reused, not rewritten."""
    ds = load_dataset(paired_layout(tmp_path / "data", 3), require_test=False)
    out = tmp_path / "out"
    out.mkdir()
    old = {"format": "arena-split-v1", "seed": 42, "val_fraction": 0.3,
           "train": {"train/fake/f000.mp4": 1, "train/fake/f001.mp4": 1, "train/real/r001.mp4": 0,
                     "train/real/r002.mp4": 0},
           "val": {"train/fake/f002.mp4": 1, "train/real/r000.mp4": 0}}
    (out / SPLIT_FILE).write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    before = (out / SPLIT_FILE).read_bytes()
    split = ensure_split(ds, out)
    assert (split.groups, split.folds, split.pairs, split.group_source) == ("none", 1, [], "none")
    assert [i.key for i in split.val] == ["train/fake/f002.mp4", "train/real/r000.mp4"] and split.fold(0) is split
    assert make_split(ds, out, groups="none").sha256 == split.sha256 and (out / SPLIT_FILE).read_bytes() == before
    with pytest.raises(DataError, match="made with seed=42, val_fraction=0.3, groups=none, but .*groups=auto was "
                                        "asked.*--new-split"):
        make_split(ds, out)
    assert stored_parts(out)["train/real/r000.mp4"] == "val"


def test_ensure_split_default_is_grouped(tmp_path):
    ds = load_dataset(paired_layout(tmp_path / "data", 4), require_test=False)
    split = ensure_split(ds, tmp_path / "out")
    assert (split.groups, split.folds, len(split.pairs)) == ("auto", 1, 4) and _pairs_apart(split) == 0
    assert split.counts()["val_real"] == split.counts()["val_fake"] >= 1


# ------------------------------------------------------------------------------------------ the command


def test_split_cli_json_and_previous_leak(tmp_path):
    data, out = paired_layout(tmp_path / "data", 30), tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(main, ["split", "--data", str(data), "--out", str(out), "--groups", "none"])
    assert res.exit_code == 0, res.output
    assert "groups: none: 0 pair(s); 60 videos in 60 groups (every video alone)" in res.output
    assert "split: train 42 (21 real / 21 fake), val 18 (9 real / 9 fake), seed 42, val_fraction 0.3, groups none" \
        in res.output
    res = runner.invoke(main, ["split", "--data", str(data), "--out", str(out), "--folds", "3", "--new-split",
                               "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert sorted(doc["pairs"])[:2] == [["r000.mp4", "f000.mp4"], ["r001.mp4", "f001.mp4"]]  # names as in the CSV
    assert len(doc["pairs"]) == 30 and doc["groups"] == "auto" and doc["previous_pairs_across"] > 0
    assert [f["val"] for f in doc["folds"]] == [{"real": 10, "fake": 10}] * 3
    assert all(f["train"] == {"real": 20, "fake": 20} for f in doc["folds"])
    assert f"puts {doc['previous_pairs_across']} of these 30 pair(s) on both sides" in res.stderr
    res = runner.invoke(main, ["split", "--data", str(data), "--out", str(out), "--folds", "3"])
    assert res.exit_code == 0 and "puts 0 of these 30 pair(s) on both sides" in res.output
    assert "fold 2: train 40 (20 real / 20 fake), val 20 (10 real / 10 fake)" in res.output
    assert "split: 3 folds, seed 42, groups auto" in res.output


def test_split_cli_refusals(tmp_path):
    data = make_layout(tmp_path / "data", 3, 3, 0, test_csv=False)
    res = CliRunner().invoke(main, ["split", "--data", str(data), "--out", str(tmp_path / "o"), "--groups", "column"])
    assert res.exit_code == 1 and "--groups column: " in res.output and "has no group column" in res.output
    res = CliRunner().invoke(main, ["split", "--data", str(data), "--out", str(tmp_path / "o"), "--folds", "3",
                                    "--val-fraction", "0.2"])
    assert res.exit_code == 2 and "--val-fraction applies to --folds 1 only" in res.output
