"""Head tuning on a small synthetic feature cache: objective, resume, stale trials, workers, frame test."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from arena import metrics
from arena.cache import CacheWriter, FeatureCache, Provenance, union_indices
from arena.data import load_dataset, make_split
from arena.tune import (
    HeadData,
    HeadDataStore,
    HeadParams,
    Objective,
    TrainConfig,
    create_storage,
    frame_test,
    load_head,
    recover_stale_trials,
    run_frame_test,
    run_study,
    train_head,
    tune_head,
)

VARIANTS = ("original", "hflip", "shift_scale_rotate", "brightness_up", "brightness_down")
DIM = 16
FRAMES = (6, 8)
FAST = TrainConfig(max_epochs=12, patience=3, batch_size=16, seed=0)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices: a second thread only adds synchronisation, and CI cores are shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    torch.set_num_threads(before)


def make_layout(root: Path, n_per_class: int) -> Path:
    for sub in ("train/real", "train/fake", "test"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_per_class):
        for cls, lab in (("real", 0), ("fake", 1)):
            (root / f"train/{cls}/{cls[0]}{i:03d}.mp4").write_bytes(b"\x00")
            rows.append(f"{cls[0]}{i:03d}.mp4,{lab}")
    (root / "test/t000.mp4").write_bytes(b"\x00")
    (root / "train_labels.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
    (root / "test_public.csv").write_text("filename\nt000.mp4\n")
    return root


def video_features(key: str, label: int, n: int, idx: np.ndarray, *, shift: float) -> np.ndarray:
    """[V, U, d]: noise at the tiny scale of a random backbone, plus a class-dependent shift in 3 dims."""
    rng = np.random.default_rng(sum(map(ord, key)))
    x = rng.standard_normal((len(VARIANTS), len(idx), DIM)) * 0.01
    x[:, :, :3] += (2 * label - 1) * shift * 0.01
    return x.astype(np.float16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """data/ (40+40 placeholder videos), models/split.json, cache.h5 with separable features; one failed video."""
    root = tmp_path_factory.mktemp("tune")
    data = make_layout(root / "data", 40)
    models = root / "models"
    split = make_split(load_dataset(data), models)
    prov = Provenance(backbone="test_vit", weights_source="random:seed=0", weights_hash="ab" * 32,
                      input_size=(96, 96), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", tta={},
                      variants=VARIANTS, frame_counts=FRAMES, arena_version="0.1.0", split_sha256=split.sha256,
                      feature_dim=DIM)
    cache = root / "cache.h5"
    failed = split.train[0].key
    with CacheWriter(cache, prov) as w:
        for j, item in enumerate(split.train + split.val):
            if item.key == failed:
                w.write_failure(item.key, label=item.label, message="could not decode")
                continue
            n = 5 + (j * 7) % 30  # n < 8 for some: repeated indices, masked frames
            idx = union_indices(n, FRAMES)
            w.write(item.key, features=video_features(item.key, item.label, n, idx, shift=0.8), frame_indices=idx,
                    num_source_frames=n, label=item.label)
    return {"root": root, "data": data, "models": models, "cache": cache, "split": split, "failed": failed}


@pytest.fixture(scope="module")
def store(setup) -> HeadDataStore:
    return HeadDataStore.from_cache(FeatureCache.open(setup["cache"]), setup["split"])


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_against_hand_computed_values():
    y = [0, 0, 1, 1]
    p = [0.1, 0.4, 0.35, 0.8]
    # pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3 of 4
    assert metrics.auc(y, p) == pytest.approx(0.75)
    assert metrics.auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)  # a tie counts one half
    assert metrics.log_loss([1, 0], [0.8, 0.3]) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    assert math.isfinite(metrics.log_loss([1], [0.0]))  # clipped, not inf
    assert metrics.confusion(y, p) == {"tn": 2, "fp": 0, "fn": 1, "tp": 1}
    assert metrics.accuracy(y, p) == pytest.approx(0.75)
    assert metrics.f1(y, p) == pytest.approx(2 / 3)
    assert metrics.f1([0, 0], [0.1, 0.2]) == 0.0
    assert metrics.mean_confidence([0.1, 0.6, 0.5]) == pytest.approx((0.9 + 0.6 + 0.5) / 3)
    s = metrics.summary(y, p)
    assert s["auc"] == pytest.approx(0.75) and s["n"] == 4
    assert metrics.summary([1, 1], [0.9, 0.8])["auc"] is None


def test_metrics_refuse_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        metrics.auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="differ in length"):
        metrics.log_loss([0, 1], [0.5])
    with pytest.raises(ValueError, match=r"0 \(real\) or 1 \(fake\); got \[2\]"):
        metrics.accuracy([0, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.log_loss([0, 1], [0.5, 1.5])
    with pytest.raises(ValueError, match="NaN"):
        metrics.auc([0, 1], [float("nan"), 0.5])


# ------------------------------------------------------------------------------------------------ core


def test_head_data_from_cache(setup, store):
    data = store.get(8)
    split = setup["split"]
    assert data.train_x.dtype == torch.float16
    assert tuple(data.train_x.shape[1:]) == (len(VARIANTS), 8, DIM)
    assert data.val_x.shape[1] == 1  # validation: the original view only
    assert setup["failed"] in data.skipped and setup["failed"] not in data.train_keys
    assert data.train_x.shape[0] == len(split.train) - 1 and data.val_x.shape[0] == len(split.val)
    assert not set(data.val_keys) & set(data.train_keys)
    mean, std = data.feature_stats()
    assert mean.shape == (DIM,) and (std > 0).all()
    with pytest.raises(ValueError, match=r"frames=7 is not available; the cache holds \(6, 8\)"):
        store.get(7)


def test_objective_under_fixed_trial_is_finite(store):
    trial = optuna.trial.FixedTrial({"attn_dim": 64, "dropout": 0.5, "lr": 3e-4, "weight_decay": 1e-4,
                                     "frames": 6, "tta_aug": True, "input_dropout": 0.5})
    value = Objective(store, config=FAST)(trial)
    assert math.isfinite(value) and value > 0
    assert set(trial.user_attrs) >= {"auc", "accuracy", "f1"}


def test_input_dropout_is_searched_and_reaches_the_head(store):
    from arena.tune import suggest_params

    base = HeadParams(attn_dim=64, lr=1e-3, frames=8)
    plain = train_head(base, store.get(8), config=FAST)
    dropped = train_head(dataclasses.replace(base, input_dropout=0.6), store.get(8), config=FAST)
    assert dropped.head_config["input_dropout"] == 0.6 and plain.head_config["input_dropout"] == 0.0
    assert dropped.history != plain.history  # the option acts in the training loop
    assert dropped.metrics["auc"] >= 0.9  # and the head still learns the separable features through it
    trial = optuna.trial.FixedTrial({"attn_dim": 64, "dropout": 0.5, "lr": 3e-3, "weight_decay": 1e-1,
                                     "frames": 8, "tta_aug": False, "input_dropout": 0.9})
    assert suggest_params(trial, FRAMES).input_dropout == 0.9  # the ends of the ranges are in the space
    with pytest.raises(ValueError, match="input_dropout"):
        HeadParams(input_dropout=1.0)


def test_training_is_deterministic_and_the_checkpoint_round_trips(store, tmp_path):
    from arena.tune import head_checkpoint

    params = HeadParams(attn_dim=64, lr=1e-3, frames=8)
    a = train_head(params, store.get(8), config=FAST)
    b = train_head(params, store.get(8), config=FAST)
    assert a.val_loss == b.val_loss and a.history == b.history
    path = tmp_path / "head.pt"
    torch.save(head_checkpoint(a, store.get(8), provenance={"backbone": "test_vit"}), path)
    head, ckpt = load_head(path)
    assert ckpt["frames"] == 8 and ckpt["params"]["attn_dim"] == 64
    d = store.get(8)
    with torch.no_grad():
        p = torch.softmax(head(d.val_x[:, 0], d.val_mask)[0], -1)[:, 1].numpy()
    np.testing.assert_allclose(p, a.val_probs, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_refused(store, tmp_path):
    good = store.get(6)
    with pytest.raises(ValueError, match="needs both classes"):
        HeadData(6, VARIANTS, good.train_x, good.train_mask, torch.zeros_like(good.train_y), good.val_x,
                 good.val_mask, good.val_y)
    with pytest.raises(ValueError, match="params ask for 8 frames but the data has 6"):
        train_head(HeadParams(frames=8), good)
    with pytest.raises(ValueError, match="frame counts \\[48\\] are not in the cache"):
        Objective(store, frame_choices=(6, 48))
    with pytest.raises(ValueError, match="Invalid storage"):
        create_storage("redis-ish:foo")
    from arena.tune import redact_url

    assert redact_url("postgresql://ann:s3cret@db.host:5432/optuna") == "postgresql://ann:***@db.host:5432/optuna"
    with pytest.raises(ValueError, match="n_trials must be >= 1"):
        run_study(store, storage=create_storage(f"journal:{tmp_path / 'j.log'}"), n_trials=0)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt: cannot be loaded"):
        load_head(tmp_path / "bad.pt")


# ------------------------------------------------------------------------------------------------ studies


def _finished(study) -> int:
    return sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)


def test_tune_head_end_to_end_reaches_high_auc(setup):
    models = setup["models"]
    s = tune_head(setup["cache"], setup["data"], models, n_trials=4, epochs=FAST.max_epochs,
                  patience=FAST.patience, batch_size=FAST.batch_size, device="cpu", progress=False)
    assert s["reached_target"] and s["trials"][0]["params"]["attn_dim"] == 256  # the seed's defaults go first
    assert s["best_trial"]["user_attrs"]["auc"] >= 0.95
    assert s["retrained"]["abs_diff"] < 1e-9  # the saved head is the best trial's head
    params = json.loads((models / "best_head_params.json").read_text())
    assert set(params) >= {"attn_dim", "dropout", "lr", "weight_decay", "frames", "tta_aug"}
    ckpt = torch.load(models / "best_head.pt", weights_only=True)
    assert ckpt["provenance"]["backbone"] == "test_vit" and ckpt["frames"] == params["frames"]
    assert ckpt["head_config"]["attn_dim"] == params["attn_dim"]
    summary = json.loads((models / "study_summary.json").read_text())
    assert summary["best_value"] == pytest.approx(s["best_value"])
    assert (models / "optuna.db").is_file() and (models / "optuna_history.png").is_file()
    assert (models / "optuna_importances.png").is_file()
    # The same command again resumes: nothing new to do.
    again = tune_head(setup["cache"], setup["data"], models, n_trials=4, epochs=FAST.max_epochs,
                      patience=FAST.patience, batch_size=FAST.batch_size, device="cpu", progress=False)
    assert again["n_trials"] == 4

    out = frame_test(setup["cache"], setup["data"], models, device="cpu", progress=False)
    doc = json.loads((models / "frame_test.json").read_text())
    assert doc["criterion"] == "val_log_loss" and set(doc["results"]) == {"6", "8"}
    losses = {int(k): r["log_loss"] for k, r in doc["results"].items()}
    assert doc["recommended_frames"] == min(losses, key=losses.get) == out["recommended_frames"]


def test_interrupted_study_resumes_to_the_same_trials(store, tmp_path):
    kw = {"study_name": "s", "seed": 3, "config": FAST, "progress": False, "n_startup_trials": 2}
    straight = run_study(store, storage=create_storage(f"journal:{tmp_path / 'a.log'}"), n_trials=5, **kw)
    url = f"sqlite:///{tmp_path / 'b.db'}"
    first = run_study(store, storage=create_storage(url), n_trials=3, **kw)
    assert _finished(first) == 3
    resumed = run_study(store, storage=create_storage(url), n_trials=5, **kw)
    assert _finished(resumed) == 5 and len(resumed.trials) == 5
    assert [t.params for t in resumed.trials] == [t.params for t in straight.trials]
    assert [t.value for t in resumed.trials] == pytest.approx([t.value for t in straight.trials])


def test_ctrl_c_requeues_the_interrupted_trial(store, tmp_path, monkeypatch):
    import arena.tune as tune

    kw = {"study_name": "c", "seed": 5, "config": FAST, "progress": False, "n_startup_trials": 2}
    straight = run_study(store, storage=create_storage(f"journal:{tmp_path / 'a.log'}"), n_trials=3, **kw)
    real, calls = tune.train_head, []

    def interrupted_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tune, "train_head", interrupted_second_time)
    url = f"journal:{tmp_path / 'b.log'}"
    with pytest.raises(KeyboardInterrupt):
        run_study(store, storage=create_storage(url), n_trials=3, **kw)
    monkeypatch.setattr(tune, "train_head", real)
    resumed = run_study(store, storage=create_storage(url), n_trials=3, **kw)
    done = [t for t in resumed.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert [t.params for t in done] == [t.params for t in straight.trials]
    assert [t.state.name for t in resumed.trials].count("FAIL") == 1


def test_study_with_another_search_space_is_refused(store, tmp_path, monkeypatch):
    import arena.tune as tune

    url = f"sqlite:///{tmp_path / 'c.db'}"
    run_study(store, storage=create_storage(url), n_trials=1, frame_choices=(6,), config=FAST, progress=False)
    with pytest.raises(ValueError, match="different settings .*frame_choices.*another --study-name"):
        run_study(store, storage=create_storage(url), n_trials=2, frame_choices=(6, 8), config=FAST, progress=False)
    # Other ranges (a study of an earlier arena version, say) are refused too, not silently mixed in.
    monkeypatch.setitem(tune.SEARCH_SPACE, "lr", ("log_float", (1e-4, 1e-3)))
    with pytest.raises(ValueError, match="different settings .*search_space"):
        run_study(store, storage=create_storage(url), n_trials=2, frame_choices=(6,), config=FAST, progress=False)


# The child records itself as arena.tune's Objective does (without importing torch: seconds saved per test).
KILLED_WORKER = """
import os, signal, socket, sys
import optuna
stat = open(f"/proc/{os.getpid()}/stat").read() if os.path.isdir("/proc") else None
start = int(stat.rsplit(")", 1)[1].split()[19]) if stat else None
study = optuna.load_study(study_name="k", storage=sys.argv[1])
D = optuna.distributions
trial = study.ask({"attn_dim": D.CategoricalDistribution([64, 128, 256, 512]), "dropout": D.FloatDistribution(0.3, 0.7),
                   "lr": D.FloatDistribution(1e-4, 3e-3, log=True), "frames": D.CategoricalDistribution([6, 8]),
                   "weight_decay": D.FloatDistribution(1e-6, 1e-1, log=True),
                   "tta_aug": D.CategoricalDistribution([False, True]),
                   "input_dropout": D.FloatDistribution(0.0, 0.9)})
trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(), "start": start})
os.kill(os.getpid(), signal.SIGKILL)  # dies inside the trial, as kill -9 would
"""


def test_trial_of_a_killed_worker_is_failed_and_retried(store, tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    kw = {"study_name": "k", "config": FAST, "progress": False}
    run_study(store, storage=create_storage(url), n_trials=1, **kw)
    assert _worker_alive_record_matches_child_format()
    proc = subprocess.run([sys.executable, "-c", KILLED_WORKER, url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    study = optuna.load_study(study_name="k", storage=create_storage(url))
    stale = study.trials[-1]
    assert stale.state.name == "RUNNING"
    study = run_study(store, storage=create_storage(url), n_trials=3, **kw)
    states = [t.state.name for t in study.trials]
    assert states[stale.number] == "FAIL" and "RUNNING" not in states
    assert "died" in study.trials[stale.number].user_attrs["fail_reason"]
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == stale.number]
    assert len(retry) == 1 and retry[0].params == stale.params  # all drawn before the kill: retried as they were
    assert _finished(study) == 3
    assert recover_stale_trials(study) == []  # nothing left to recover


def test_two_workers_share_one_journal(setup, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "split.json").write_bytes((setup["models"] / "split.json").read_bytes())
    journal = tmp_path / "optuna.journal"
    cmd = [sys.executable, "-m", "arena", "tune-head", "--cache", str(setup["cache"]), "--data", str(setup["data"]),
           "--models", str(models), "--storage", f"journal:{journal}", "--n-trials", "4", "--epochs", "3",
           "--batch-size", "16", "--threads", "1", "--device", "cpu"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="head", storage=create_storage(f"journal:{journal}"))
    pids = {t.user_attrs["worker"]["pid"] for t in study.trials}
    assert pids == {p.pid for p in procs}  # both workers added trials
    assert _finished(study) >= 4 and not any(t.state.name in ("RUNNING", "FAIL") for t in study.trials)
    assert (models / "best_head.pt").is_file()


def test_frame_test_recommends_the_lowest_log_loss(store):
    out = run_frame_test(store, HeadParams(attn_dim=64, lr=1e-3), config=FAST, progress=False)
    losses = {int(k): r["log_loss"] for k, r in out["results"].items()}
    assert out["recommended_frames"] == min(losses, key=losses.get)
    assert out["criterion"] == "val_log_loss"
    assert all(0.5 <= r["mean_confidence"] <= 1 for r in out["results"].values())


def test_frame_test_needs_a_tuned_head(setup, tmp_path):
    with pytest.raises(ValueError, match="run `arena tune-head"):
        frame_test(setup["cache"], setup["data"], tmp_path, device="cpu")


def test_cli_refuses_impossible_options(setup):
    from click.testing import CliRunner

    from arena.cli import main

    r = CliRunner().invoke(main, ["tune-head", "--data", str(setup["data"]), "--n-trials", "0"])
    assert r.exit_code == 2 and "--n-trials" in r.output
    r = CliRunner().invoke(main, ["tune-head", "--data", str(setup["data"]), "--frames", "0,8"])
    assert r.exit_code == 2 and "1..512" in r.output


def _worker_alive_record_matches_child_format() -> bool:
    from arena.tune import _worker_identity

    return set(_worker_identity()) == {"host", "pid", "start"}


def test_process_liveness_check():
    from arena.tune import _worker_alive, _worker_identity

    me = _worker_identity()
    assert _worker_alive(me)
    assert not _worker_alive({**me, "start": (me["start"] or 0) + 1}) or me["start"] is None  # a reused pid


@pytest.mark.slow
@pytest.mark.parametrize("kill_seed", [0])
def test_kill9_during_tune_head_then_rerun_equals_uninterrupted(setup, tmp_path, kill_seed):
    """kill -9 at a seeded random moment, rerun the same command: same trials and best head as a straight run."""
    import random
    import time

    def args(models: Path) -> list[str]:
        return ["tune-head", "--cache", str(setup["cache"]), "--data", str(setup["data"]), "--models", str(models),
                "--n-trials", "4", "--epochs", "4", "--batch-size", "16", "--threads", "1", "--device", "cpu"]

    def prepare(name: str) -> Path:
        models = tmp_path / name
        models.mkdir()
        (models / "split.json").write_bytes((setup["models"] / "split.json").read_bytes())
        return models

    from click.testing import CliRunner

    from arena.cli import main

    straight, killed = prepare("straight"), prepare("killed")
    assert CliRunner().invoke(main, args(straight)).exit_code == 0
    proc = subprocess.Popen([sys.executable, "-m", "arena", *args(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "optuna.db").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the study exists: trials are about to run
    time.sleep(random.Random(kill_seed).uniform(0.2, 1.5))
    proc.kill()
    assert proc.wait() == -9, "the run finished before the kill; the test needs a shorter delay"
    result = CliRunner().invoke(main, args(killed))
    assert result.exit_code == 0, result.output
    a = json.loads((straight / "study_summary.json").read_text())
    b = json.loads((killed / "study_summary.json").read_text())
    assert "RUNNING" not in b["states"]
    finished = lambda s: [t for t in s["trials"] if t["state"] in ("COMPLETE", "PRUNED")]  # noqa: E731
    assert [t["params"] for t in finished(b)] == [t["params"] for t in finished(a)]
    assert b["best_value"] == pytest.approx(a["best_value"], rel=1e-6)
    sa = torch.load(straight / "best_head.pt", weights_only=True)["state_dict"]
    sb = torch.load(killed / "best_head.pt", weights_only=True)["state_dict"]
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key])
