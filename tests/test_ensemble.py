"""Ensembles: members from models folders, fold folders and checkpoints; shared decodes and backbone passes; the
mean of calibrated probabilities or logits; per-member detail columns, verification and evaluation."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _world import FRAMES, IMAGE_SIZE, World, build_world, save_head_only
from click.testing import CliRunner
from scipy.special import expit, logit

import arena.clips
from arena.cli import main
from arena.data import load_dataset
from arena.ensemble import (
    Member,
    combine_predictions,
    member_sources,
    predict_members,
    unique_names,
)
from arena.errors import ModelsError, OptionError, PredictError, SubmissionError
from arena.evaluate import evaluate, metrics_lines
from arena.features import extract_features
from arena.models_folder import BEST_HEAD_FILE, FRAME_TEST_FILE, HeadCheckpoint, fold_dir
from arena.predict import VideoPrediction, load_model, predict_items
from arena.split import make_split
from arena.submit import make_submission


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.getbasetemp())


def _frame_test(folder: Path) -> None:
    (folder / FRAME_TEST_FILE).write_text(json.dumps({"recommended_frames": FRAMES}))


@pytest.fixture(scope="module")
def study(world: World, tmp_path_factory) -> Path:
    """A K-fold study as tune-head leaves it: the parent holds split.json (2 folds) and no model of its own;
    ``folds/fold_<i>`` hold a head tuned on the world's cache (a HeadCheckpoint with an extra key, as the K-fold
    tune-head may write) and frame_test.json. A third head, ``extra/best_head.pt``, lies beside it."""
    root = tmp_path_factory.mktemp("study")
    make_split(load_dataset(world.data), root / "models", folds=2, groups="none")
    for i in range(2):
        folder = fold_dir(root / "models", i)
        folder.mkdir(parents=True)
        save_head_only(world.cache, folder, seed=10 + i)
        ckpt = HeadCheckpoint.load(folder / BEST_HEAD_FILE)
        ckpt.calibration = {"temperature": 1.5 + i}  # each member applies its own temperature
        ckpt.save(folder / BEST_HEAD_FILE)
        _frame_test(folder)
    (root / "extra").mkdir()
    save_head_only(world.cache, root / "extra", seed=12)
    _frame_test(root / "extra")
    return root


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _submit(world: World, out: Path, **kwargs):
    return make_submission(data=world.data, out=out, workers=0, device="cpu", progress=False, echo=None, **kwargs)


# ------------------------------------------------------------------------------------------------------- members


def test_members_from_folds_folders_and_checkpoints(world: World, study: Path, tmp_path):
    said: list[str] = []
    parent = member_sources(study / "models", echo=said.append)  # no model of its own: its folds
    assert [(s.name, s.fold, s.kind) for s in parent] == [("fold_0", 0, "auto"), ("fold_1", 1, "auto")]
    assert said == [f"{study / 'models'}: no model of its own; its 2 fold models are the members (fold_0, fold_1)"]
    assert all(s.split_root.resolve() == (study / "models").resolve() for s in parent)
    assert [s.path for s in member_sources(study / "models" / "folds")] == [s.path for s in parent]

    ckpt = study / "extra" / BEST_HEAD_FILE
    fold_1 = fold_dir(study / "models", 1)
    finetuned = world.models_ft / "test_resnet_best.pt"
    mixed = member_sources([world.models, fold_1], [ckpt, fold_1 / BEST_HEAD_FILE, finetuned])
    assert [(s.name, s.kind, s.fold) for s in mixed] == [
        ("models", "auto", None), ("models_fold_1", "auto", 1), ("extra", "head-only", None),
        ("models_fold_1_2", "head-only", 1), ("test_resnet_best", "finetuned", None)]
    assert mixed[3].split_root.resolve() == (study / "models").resolve()
    # The same folder twice, and names that would clash with predictions_detail.csv's own p_* columns.
    assert unique_names([("models", "a"), ("models", "a"), ("original", "b"), ("x", "c")]) == [
        "a_models", "a_models_2", "b_original", "x"]

    (tmp_path / "empty" / "folds").mkdir(parents=True)
    with pytest.raises(ModelsError, match=r"empty/folds: no fold_<i> folder in it"):
        member_sources(tmp_path / "empty" / "folds")
    (tmp_path / "last.pt").write_bytes(b"x")
    with pytest.raises(ModelsError, match=r"last.pt: not a model checkpoint; give tune-head's best_head.pt"):
        member_sources(checkpoints=[tmp_path / "last.pt"])
    with pytest.raises(ModelsError, match=r"nope_best.pt: checkpoint not found"):
        member_sources(checkpoints=[tmp_path / "nope_best.pt"])
    with pytest.raises(OptionError, match="no model given: pass --models DIR"):
        member_sources()
    with pytest.raises(ModelsError, match=r"best_head.pt is a head-only checkpoint, but --model finetuned"):
        load_model(ckpt, kind="finetuned")
    with pytest.raises(PredictError, match=r"fold_0/best_head.pt was trained on none .*--crop faces was asked for"):
        make_submission(data=world.data, models=study / "models", out=tmp_path / "P.CSV", crop="faces",
                        device="cpu", progress=False, echo=None)


def test_checkpoint_member_alone_is_the_models_folder(world: World, tmp_path):
    """One member is exactly today's submission, however it is named."""
    a, b = tmp_path / "a" / "P.CSV", tmp_path / "b" / "P.CSV"
    _submit(world, a, models=world.models)
    _submit(world, b, checkpoints=[world.models / BEST_HEAD_FILE])
    assert a.read_bytes() == b.read_bytes()
    assert (a.parent / "predictions_detail.csv").read_bytes() == (b.parent / "predictions_detail.csv").read_bytes()


# ------------------------------------------------------------------------------------------------------ sharing


def _members(sources, **kwargs) -> list[Member]:
    encoders: dict = {}
    return [Member(s, load_model(s.path, kind=s.kind, encoders=encoders, **kwargs)) for s in sources]


def test_head_ensemble_decodes_once_and_runs_one_backbone_pass(world: World, study: Path, monkeypatch):
    members = _members(member_sources(study / "models", [study / "extra" / BEST_HEAD_FILE]))
    encoder = members[0].model.encoder
    assert all(m.model.encoder is encoder for m in members)  # one cache: one recreated encoder

    decodes, forwards = [], []
    real_decode, real_forward = arena.clips.decode_selected, encoder.forward
    monkeypatch.setattr(arena.clips, "decode_selected", lambda path, *a, **k: decodes.append(path)
                        or real_decode(path, *a, **k))
    monkeypatch.setattr(encoder, "forward", lambda x: forwards.append(len(x)) or real_forward(x))
    items = load_dataset(world.data).test[:2]
    run = predict_members(items, members, workers=0, progress=False)
    assert len(decodes) == len(items) and sorted(map(str, decodes)) == sorted(str(it.path) for it in items)
    assert len(forwards) == len(items) and run.frames_encoded == len(items) * FRAMES * 5
    assert (run.decodes, run.passes) == (1, 1)
    assert "3 members: 1 decode(s) and 1 backbone pass(es) per video" in "\n".join(run.summary_lines())

    # A member alone gives the same numbers; the ensemble is the members' mean.
    monkeypatch.undo()
    for m in members[1:]:
        alone = predict_items(items, load_model(m.source.path, kind=m.source.kind), workers=0, progress=False)
        assert [p.p_fake for p in alone.predictions] == pytest.approx([p.p_fake for p in run.by_member[m.name]],
                                                                      abs=1e-6)
    p = np.array([[p.p_fake for p in run.by_member[m.name]] for m in members])
    assert [q.p_fake for q in run.predictions] == pytest.approx(p.mean(0), abs=1e-12)
    assert members[0].model.temperature == 1.5 and members[1].model.temperature == 2.5


def test_combine_probabilities_logits_and_failed_members():
    a = VideoPrediction("k", 0.9, {"original": 0.8, "hflip": 1.0}, label=1, p_uncalibrated=0.95)
    b = VideoPrediction("k", 0.3, {"original": 0.2, "hflip": 0.4}, label=1, fallback="retry", error="OOM once")
    prob = combine_predictions({"a": a, "b": b}, "prob")
    assert prob.p_fake == pytest.approx(0.6) and prob.variant_p == pytest.approx({"original": 0.5, "hflip": 0.7})
    assert prob.p_uncalibrated == pytest.approx((0.95 + 0.3) / 2) and prob.fallback == "retry"
    lg = combine_predictions({"a": a, "b": b}, "logit")
    assert lg.p_fake == pytest.approx(float(expit((logit(0.9) + logit(0.3)) / 2)))
    assert combine_predictions({"a": a}, "logit") is a
    # A member that failed on the video is no prediction: left out, its error kept.
    failed = VideoPrediction("k", 0.5, label=1, status="failed", fallback="0.5 (error)", error="boom")
    both = combine_predictions({"a": a, "f": failed})
    assert both.p_fake == pytest.approx(0.9) and both.status == "ok" and both.error == "boom"
    assert combine_predictions({"f": failed, "g": failed}).status == "failed"
    with pytest.raises(OptionError, match=r"Invalid ensemble mode \(median\)"):
        combine_predictions({"a": a, "b": b}, "median")


# ---------------------------------------------------------------------------------------------------- submit


def test_submit_ensemble_prints_members_writes_detail_columns_and_verifies(world: World, study: Path, tmp_path):
    out = tmp_path / "sub" / "PREDICTIONS.CSV"
    res = CliRunner().invoke(main, ["submit", "--data", str(world.data), "--models", str(study / "models"),
                                    "--checkpoint", str(study / "extra" / BEST_HEAD_FILE), "--out", str(out),
                                    "--verify", str(world.cache), "--verify-all", "--workers", "0",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "no model of its own; its 2 fold models are the members (fold_0, fold_1)" in res.output
    assert ("ensemble of 3 members (mean of calibrated probabilities), TTA 5 variant(s), device cpu; 1 decode(s) "
            "and 1 backbone pass(es) per video:") in res.output
    assert f"  fold_1: head-only ({fold_dir(study / 'models', 1) / BEST_HEAD_FILE}), {FRAMES} frames (" in res.output
    assert "temperature 2.500" in res.output
    for name in ("fold_0", "fold_1", "extra"):
        assert f"member {name}: verify (same weights" in res.output
    rows, detail = _read(out), _read(out.parent / "predictions_detail.csv")
    assert list(detail[0])[-3:] == ["p_fold_0", "p_fold_1", "p_extra"]
    for r, d in zip(rows, detail, strict=True):
        members = [float(d[f"p_{n}"]) for n in ("fold_0", "fold_1", "extra")]
        assert float(d["p_fake"]) == pytest.approx(np.mean(members), abs=2e-6)
        assert float(r["probability"]) == pytest.approx(max(float(d["p_fake"]), 1 - float(d["p_fake"])), abs=1e-6)

    lg = _submit(world, tmp_path / "logit" / "P.CSV", models=study / "models",
                 checkpoints=[study / "extra" / BEST_HEAD_FILE], ensemble="logit")
    for d, pred in zip(detail, lg.predictions, strict=True):
        members = [float(d[f"p_{n}"]) for n in ("fold_0", "fold_1", "extra")]
        assert pred.p_fake == pytest.approx(float(expit(np.mean(logit(members)))), abs=1e-5)


def test_members_with_other_encoders_verify_against_their_own_cache(world: World, study: Path, tmp_path):
    """A head tuned on another cache (other backbone weights) needs a second backbone pass and its own --verify
    cache; a fine-tuned member brings its backbone and is verified as a fine-tuned model is."""
    other = tmp_path / "other.h5"
    extract_features(data=world.data, cache=other, frame_counts=(FRAMES,), backbone="test_resnet",
                     pretrained=False, image_size=IMAGE_SIZE, seed=5, device="cpu", workers=0)
    (tmp_path / "seed5").mkdir()
    save_head_only(other, tmp_path / "seed5")
    _frame_test(tmp_path / "seed5")
    models = [fold_dir(study / "models", 0), tmp_path / "seed5", world.models_ft]
    with pytest.raises(SubmissionError, match=r"--verify: member seed5 \(.*seed5/best_head.pt\): Cannot verify "
                                              r"against .*features.h5: the submission encoder's weights hash"):
        _submit(world, tmp_path / "P.CSV", models=models, verify=world.cache)
    lines: list[str] = []
    res = make_submission(data=world.data, models=models, out=tmp_path / "P.CSV", verify=[other, world.cache],
                          verify_sample=2, workers=0, device="cpu", progress=False, echo=lines.append)
    assert "3 members (mean of calibrated probabilities), TTA 5 variant(s), device cpu; 1 decode(s) and 3 backbone" \
           in "\n".join(lines)
    assert {n: v.mode for n, v in res.verifies.items()} == {"fold_0": "cache-features", "seed5": "cache-features",
                                                            "models_ft": "finetuned"}
    assert all(v.ok and len(v.keys) == 2 for v in res.verifies.values()) and res.verify is None


# -------------------------------------------------------------------------------------------------- evaluate


def test_evaluate_ensemble_reports_each_member_and_their_mean(world: World, study: Path, tmp_path):
    labels = world.data / "test_labels.csv"
    res = evaluate(data=world.data, models=study / "models", checkpoints=[study / "extra" / BEST_HEAD_FILE],
                   labels=labels, out=tmp_path / "e.json", workers=0, device="cpu", progress=False,
                   attention_first=1)
    ens = res["ensemble"]
    assert res["model"]["kind"] == "ensemble" and ens["combine"] == "prob"
    assert [r["name"] for r in ens["members"]] == ["fold_0", "fold_1", "extra"]
    aucs = [r["metrics"]["tta"]["auc"] for r in ens["members"]]
    assert ens["mean_member"]["auc"] == pytest.approx(np.mean(aucs))
    assert ens["ensemble_minus_mean_member"]["auc"] == pytest.approx(res["metrics"]["tta"]["auc"] - np.mean(aucs))
    assert ens["members"][1]["calibration"]["temperature"] == 2.5
    assert res["calibration"]["temperature"] == {"fold_0": 1.5, "fold_1": 2.5, "extra": 1.0}
    v = res["videos"][0]
    assert v["p_fake"] == pytest.approx(np.mean(list(v["p_members"].values())), abs=2e-6)
    assert res["attention"][0]["member"] == "fold_0"
    text = "\n".join(metrics_lines(res))
    assert "model ensemble of 3 (prob)" in text and "mean of members" in text and "(ensemble - mean: AUC" in text
    # A member's numbers are the ones it gets alone.
    alone = evaluate(data=world.data, models=fold_dir(study / "models", 1), labels=labels, out=tmp_path / "1.json",
                     workers=0, device="cpu", progress=False)
    assert alone["metrics"]["tta"]["log_loss"] == pytest.approx(ens["members"][1]["metrics"]["tta"]["log_loss"],
                                                                abs=1e-6)


def test_evaluate_folds_out_of_fold_on_the_validation_split(world: World, study: Path, tmp_path):
    res = evaluate(data=world.data, models=study / "models", split="val", workers=0, device="cpu", progress=False)
    assert res["path"] == str(study / "models" / "evaluation.json")
    train = load_dataset(world.data).train
    assert res["n"] == len(train) and res["on"].startswith("out-of-fold validation (2 of 2 folds")
    assert res["ensemble"]["combine"] == "out-of-fold"
    fold_of = json.loads((study / "models" / "split.json").read_text())["fold"]
    assert all(v["member"] == f"fold_{fold_of[v['key']]}" for v in res["videos"])
    assert [r["n"] for r in res["ensemble"]["members"]] == [sum(f == i for f in fold_of.values()) for i in (0, 1)]
    assert "out-of-fold - mean" in "\n".join(metrics_lines(res))
    with pytest.raises(OptionError, match="--split val with fold members and other members"):
        evaluate(data=world.data, models=[study / "models", world.models], split="val", progress=False)
    shutil.copytree(fold_dir(study / "models", 1), fold_dir(study / "models", 2))
    try:
        with pytest.raises(OptionError, match=r"fold 2 does not exist: .*split.json has 2 fold\(s\)"):
            evaluate(data=world.data, models=study / "models", split="val", progress=False)
    finally:
        shutil.rmtree(fold_dir(study / "models", 2))
