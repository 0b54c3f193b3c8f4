"""`arena evaluate`: metrics with and without TTA, labelled test folders and the attention report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _world import FRAMES, World, build_world
from click.testing import CliRunner

from arena.cli import main
from arena.data import load_dataset
from arena.errors import DataError, OptionError
from arena.evaluate import evaluate, evaluation_metrics, labelled_items
from arena.predict import VideoPrediction
from arena.split import load_split


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.getbasetemp())


def test_evaluation_metrics_with_and_without_tta():
    preds = [VideoPrediction("a", 0.9, {"original": 0.6}, label=1), VideoPrediction("b", 0.2, {"original": 0.7},
                                                                                    label=0)]
    m = evaluation_metrics(preds)
    assert m["tta"]["auc"] == 1.0 and m["no_tta"]["auc"] == 0.0
    assert m["tta_minus_no_tta"]["auc"] == 1.0 and m["tta"]["confusion"] == {"tn": 1, "fp": 0, "fn": 0, "tp": 1}
    assert m["no_tta"]["confusion"] == {"tn": 0, "fp": 1, "fn": 0, "tp": 1}


def test_labelled_items_resolve_names_and_skip_bad_rows(world: World, tmp_path):
    dataset = load_dataset(world.data)
    first, second = dataset.test[0].key, dataset.test[1].key
    labels = tmp_path / "labels.csv"
    labels.write_text(f"filename,label\n{Path(first).name},FAKE\n{Path(second).stem},0\nnope.mp4,1\n"
                      f"{dataset.test[2].key},maybe\n")
    items = labelled_items(dataset, labels)
    assert [(it.key, it.label) for it in items] == [(first, 1), (second, 0)]
    labels.write_text("filename,label\nnope.mp4,1\n")
    with pytest.raises(DataError, match="no labelled test video found .*'nope.mp4' is not a usable test video"):
        labelled_items(dataset, labels)
    with pytest.raises(DataError, match="missing.csv: labels file not found"):
        labelled_items(dataset, tmp_path / "missing.csv")


def test_evaluate_on_labelled_test_set_with_attention_report(world: World, tmp_path):
    out = tmp_path / "eval" / "evaluation.json"
    res = CliRunner().invoke(main, ["evaluate", "--data", str(world.data), "--models", str(world.models),
                                    "--labels", str(world.data / "test_labels.csv"), "--out", str(out),
                                    "--attention-first", "1", "--workers", "0", "--device", "cpu",
                                    "--frame-batch", "7", "--no-amp"])
    assert res.exit_code == 0, res.output
    assert "TTA gain" in res.output and "AUC" in res.output
    doc = json.loads(out.read_text())
    assert doc["n"] == 4 and doc["failed"] == {} and doc["model"]["kind"] == "head-only"
    for name in ("tta", "no_tta"):
        m = doc["metrics"][name]
        assert 0.0 <= m["auc"] <= 1.0 and m["log_loss"] > 0 and sum(m["confusion"].values()) == 4
    (att,) = doc["attention"]
    assert len(att["attention"]) == FRAMES and sum(att["attention"]) == pytest.approx(1.0, abs=1e-4)
    assert Path(att["png"]).is_file() and Path(att["png"]).stat().st_size > 1000
    assert Path(att["png"]).parent == out.parent / "attention"


def test_evaluate_options_mean_what_they_mean_elsewhere(world: World, tmp_path):
    common = ["evaluate", "--data", str(world.data), "--models", str(world.models), "--workers", "0"]
    res = CliRunner().invoke(main, [*common, "--batch-size", "8"])
    assert res.exit_code == 2 and "No such option '--batch-size'" in res.output  # frames per forward: --frame-batch
    res = CliRunner().invoke(main, [*common, "--device", "cuda:x"])
    assert res.exit_code == 2 and "Invalid device (cuda:x)" in res.output
    res = CliRunner().invoke(main, [*common, "--attention", "nope.mp4"])  # an ArenaError: one line, exit 1
    assert res.exit_code == 1 and "Error: --attention keys not among the evaluated videos" in res.output
    assert "Traceback" not in res.output


def test_evaluate_on_validation_split(world: World, tmp_path):
    val = load_split(load_dataset(world.data), world.models).val
    res = evaluate(data=world.data, models=world.models_ft, split="val", out=tmp_path / "e.json", workers=0,
                   device="cpu", attention=[val[0].key], progress=False)
    assert res["n"] == len(val) and res["model"]["kind"] == "finetuned"
    assert [v["key"] for v in res["videos"]] == [it.key for it in val]
    assert res["attention"][0]["key"] == val[0].key
    assert json.loads((tmp_path / "e.json").read_text())["videos"] == res["videos"]
    with pytest.raises(OptionError, match="--attention keys not among"):
        evaluate(data=world.data, models=world.models, split="val", attention=["nope.mp4"], progress=False)
    with pytest.raises(OptionError, match="evaluate needs --split val or --labels CSV"):
        evaluate(data=world.data, models=world.models, split=None, progress=False)
