"""Groups of videos that share a source: from a CSV column, from DFDC-style metadata.json, or detected."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _shared import make_layout

from arena.data import load_dataset
from arena.demo import generate_dataset
from arena.errors import DataError, OptionError
from arena.groups import DEFAULT_THRESHOLD, Groups, Pair, find_groups, similar_pairs, thumbnail_vectors


def _csv(header: str, rows: list[str]) -> str:
    return header + "\n" + "\n".join(rows) + "\n"


def _pairs(groups: Groups) -> set[tuple[str, str]]:
    return {(p.a, p.b) for p in groups.pairs}


# ------------------------------------------------------------------------------------------ from the data


@pytest.mark.parametrize("column,source", [
    ("original", lambda i: f"train/real/r{i:03d}.mp4"),  # the key, as the demo writes it
    ("Source", lambda i: f"r{i:03d}.mp4"),  # a base name, any case
    ("ORIGINAL", lambda i: f"r{i:03d}"),  # without extension, as the file-name column allows
    ("original", lambda i: f"some/other/folder/r{i:03d}.mp4"),  # a path elsewhere: its base name is used
])
def test_source_column_joins_each_fake_to_its_real(tmp_path, column, source):
    rows = [f"r{i:03d}.mp4,0," for i in range(3)] + [f"f{i:03d}.mp4,1,{source(i)}" for i in range(2)] + ["f002.mp4,1,"]
    ds = load_dataset(make_layout(tmp_path, 3, 3, csv=_csv(f"filename,label,{column}", rows)))
    for mode in ("auto", "column"):
        groups = find_groups(ds, mode)
        assert _pairs(groups) == {("train/real/r000.mp4", "train/fake/f000.mp4"),
                                  ("train/real/r001.mp4", "train/fake/f001.mp4")}
        assert {p.origin for p in groups.pairs} == {"column"}
        assert groups.group["train/fake/f001.mp4"] == groups.group["train/real/r001.mp4"] == "train/fake/f001.mp4"
        assert groups.group["train/fake/f002.mp4"] == "train/fake/f002.mp4"  # empty cell: alone
        assert groups.group["train/real/r002.mp4"] == "train/real/r002.mp4"
        assert f"column {column.lower()!r}" in groups.source and groups.mode == mode
    assert "6 videos in 4 groups (2 of 2 videos)" in groups.summary()


def test_group_column_and_sources_outside_the_data(tmp_path):
    rows = ["r000.mp4,0,a", "r001.mp4,0,b", "f000.mp4,1,a", "f001.mp4,1,a", "f002.mp4,1,"]
    ds = load_dataset(make_layout(tmp_path / "g", 2, 3, csv=_csv("filename,label,group", rows)))
    groups = find_groups(ds)
    assert len(set(groups.ids(["train/real/r000.mp4", "train/fake/f000.mp4", "train/fake/f001.mp4"]))) == 1
    assert len(set(groups.group.values())) == 3 and len(groups.pairs) == 2
    # two fakes of one source that is not among the training videos still share a group
    rows = ["r000.mp4,0,", "f000.mp4,1,gone.mp4", "f001.mp4,1,elsewhere/gone.mp4", "f002.mp4,1,r000.mp4"]
    ds = load_dataset(make_layout(tmp_path / "o", 1, 3, csv=_csv("filename,label,original", rows)))
    groups = find_groups(ds)
    assert _pairs(groups) == {("train/fake/f000.mp4", "train/fake/f001.mp4"),
                              ("train/real/r000.mp4", "train/fake/f002.mp4")}


def test_dfdc_metadata_json_next_to_the_videos_and_in_the_root(tmp_path):
    root = make_layout(tmp_path, 3, 3)  # train_labels.csv without a group column
    meta = {"f000.mp4": {"label": "FAKE", "split": "train", "original": "r000.mp4"},
            "f001.mp4": {"label": "FAKE", "split": "train", "original": "r001.mp4"},
            "r000.mp4": {"label": "REAL", "split": "train", "original": None}}
    (root / "train/fake/metadata.json").write_text(json.dumps(meta))
    (root / "metadata.json").write_text(json.dumps({"train/fake/f002.mp4": {"label": "FAKE", "original": "r002"}}))
    groups = find_groups(load_dataset(root), "column")
    assert _pairs(groups) == {(f"train/real/r{i:03d}.mp4", f"train/fake/f{i:03d}.mp4") for i in range(3)}
    assert {p.origin for p in groups.pairs} == {"metadata"}
    assert groups.source == "metadata.json, train/fake/metadata.json"
    (root / "train/fake/metadata.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"train/fake/metadata.json: not a readable DFDC-style metadata file.*"
                                        r"--groups none"):
        find_groups(load_dataset(root))


def test_modes_none_column_and_bad_options(tmp_path):
    ds = load_dataset(make_layout(tmp_path, 2, 2))
    none = find_groups(ds, "none")
    assert none.pairs == [] and none.group == {k: k for k in none.group} and not none.any_shared
    with pytest.raises(DataError, match=r"--groups column: .*train_labels.csv has no group column \(accepted: "
                                        r"original, source, group.*no metadata.json.*--groups auto"):
        find_groups(ds, "column")
    with pytest.raises(OptionError, match=r"Invalid groups mode \(pairs\). Supported values are auto, column, none"):
        find_groups(ds, "pairs")
    with pytest.raises(OptionError, match="threshold must be in"):
        find_groups(ds, threshold=1.5)


def test_pairs_across_parts():
    groups = Groups("column", "test", {"a": "a", "b": "a", "c": "c"}, [Pair("a", "b", "column")])
    assert groups.across({"a": "train", "b": "val"}) == groups.pairs
    assert groups.across({"a": 1, "b": 1, "c": 0}) == [] and groups.across({"a": "train"}) == []


# ------------------------------------------------------------------------------------------ detection


@pytest.fixture(scope="module")
def paired_demo(tmp_path_factory) -> Path:
    """3 reals, 4 fakes: fake i rendered from real i's scene, fake 4 from a scene of its own."""
    out = tmp_path_factory.mktemp("groups") / "data"
    generate_dataset(out, n_train_real=3, n_train_fake=4, n_test=0, seconds=0.6, size=(64, 64), fps=10, seed=5,
                     paired=True, workers=1, progress=False)
    return out


def _hide_column(data: Path) -> None:
    path = data / "train_labels.csv"
    rows = list(csv.DictReader(path.open()))
    path.write_text(_csv("filename,label", [f"{r['filename']},{r['label']}" for r in rows]))


def test_detection_finds_the_demo_pairs_and_no_other(paired_demo, tmp_path):
    ds = load_dataset(paired_demo, require_test=False)
    truth = find_groups(ds)  # the demo writes each fake's source in `original`
    assert _pairs(truth) == {(f"train/real/real_{i:04d}.mp4", f"train/fake/fake_{i:04d}.mp4") for i in (1, 2, 3)}
    data = tmp_path / "data"
    shutil.copytree(paired_demo, data)
    _hide_column(data)
    hidden = load_dataset(data, require_test=False)
    assert hidden.group_column is None
    with pytest.raises(DataError, match="no group column"):
        find_groups(hidden, "column")
    detected = find_groups(hidden, "auto", workers=2)
    assert _pairs(detected) == _pairs(truth) and detected.group == truth.group
    assert all(p.origin == "detected" and p.similarity >= DEFAULT_THRESHOLD for p in detected.pairs)
    assert "near-duplicate detection" in detected.source and detected.undecodable == []


def test_thumbnails_and_similarity(paired_demo, tmp_path):
    paths = sorted((paired_demo / "train").rglob("*.mp4"))
    vectors = thumbnail_vectors(paths, workers=1)
    assert all(v is not None and abs(float(v @ v) - 1) < 1e-4 for v in vectors)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00")
    assert thumbnail_vectors([bad], workers=1) == [None]  # undecodable: no thumbnail, no failure
    m = np.stack(vectors)
    pairs = similar_pairs(m, DEFAULT_THRESHOLD)
    assert [(paths[i].name, paths[j].name) for i, j, _ in pairs] == [
        (f"fake_{n:04d}.mp4", f"real_{n:04d}.mp4") for n in (1, 2, 3)]
    assert len(similar_pairs(m, -1.0)) == len(paths) * (len(paths) - 1) // 2  # every i < j once


def test_undecodable_videos_stay_alone(tmp_path):
    ds = load_dataset(make_layout(tmp_path, 2, 2), require_test=False)  # one-byte placeholders
    groups = find_groups(ds, "auto", workers=1)
    assert groups.pairs == [] and len(groups.undecodable) == 4 and "without thumbnails stay alone" in groups.summary()
    assert dataclasses.replace(groups, undecodable=[]).summary().endswith("(every video alone)")


def test_csv_column_and_metadata_json_are_merged(tmp_path):
    rows = ["r000.mp4,0,", "r001.mp4,0,", "f000.mp4,1,r000.mp4", "f001.mp4,1,"]
    root = make_layout(tmp_path, 2, 2, csv=_csv("filename,label,original", rows))
    (root / "metadata.json").write_text(json.dumps({"f000.mp4": {"original": "r000.mp4"},
                                                    "f001.mp4": {"original": "r001.mp4"}}))
    groups = find_groups(load_dataset(root), "column")
    assert _pairs(groups) == {("train/real/r000.mp4", "train/fake/f000.mp4"),
                              ("train/real/r001.mp4", "train/fake/f001.mp4")}  # the pair both state: once
    assert groups.source == "train_labels.csv column 'original' + metadata.json"
