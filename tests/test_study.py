"""The Optuna study over the head (arena.study) and its storage and recovery (arena.study_storage): objective,
resume, stale trials of killed workers, several workers, outputs, and the `arena tune-head` command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from _head_world import FAST, FRAMES, copy_split
from click.testing import CliRunner

import arena.study as study_mod
from arena.cache import FeatureCache
from arena.calibration import fit_calibration
from arena.cli import main
from arena.data import load_dataset
from arena.errors import OptionError, StudyError
from arena.frame_test import frame_test
from arena.models_folder import BEST_HEAD_FILE, OPTUNA_DB, STUDY_SUMMARY_FILE, HeadCheckpoint
from arena.split import make_split
from arena.study import Objective, default_study_name, run_study, suggest_params, tune_head
from arena.study_storage import (
    create_storage,
    recover_stale_trials,
    redact_url,
    worker_alive,
    worker_identity,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _finished(study) -> int:
    return sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)


# ------------------------------------------------------------------------------------------------ objective


def test_objective_under_fixed_trial_is_finite(store):
    trial = optuna.trial.FixedTrial({"attn_dim": 64, "dropout": 0.5, "lr": 3e-4, "weight_decay": 1e-4,
                                     "frames": 6, "tta_aug": True, "input_dropout": 0.5})
    value = Objective(store, config=FAST)(trial)
    assert math.isfinite(value) and value > 0
    assert set(trial.user_attrs) >= {"auc", "accuracy", "f1"}


def test_the_ends_of_the_ranges_are_in_the_search_space():
    trial = optuna.trial.FixedTrial({"attn_dim": 64, "dropout": 0.5, "lr": 3e-3, "weight_decay": 1e-1,
                                     "frames": 8, "tta_aug": False, "input_dropout": 0.9})
    assert suggest_params(trial, FRAMES).input_dropout == 0.9


def test_bad_settings_are_refused(store, tmp_path):
    with pytest.raises(OptionError, match=r"frame counts \[48\] are not in the cache"):
        Objective(store, frame_choices=(6, 48))
    with pytest.raises(OptionError, match="Invalid storage .*journal:<file>, sqlite:///<file>"):
        create_storage("redis-ish:foo")
    with pytest.raises(OptionError, match="give a file"):
        create_storage("journal:")
    with pytest.raises(StudyError, match="--storage postgresql://ann:\\*\\*\\*@.*cannot open the Optuna storage"):
        create_storage("postgresql://ann:s3cret@127.0.0.1:1/optuna")  # no driver or no server: one clear error
    assert redact_url("postgresql://ann:s3cret@db.host:5432/optuna") == "postgresql://ann:***@db.host:5432/optuna"
    with pytest.raises(OptionError, match="--n-trials must be >= 1"):
        run_study(store, storage=create_storage(f"journal:{tmp_path / 'j.log'}"), n_trials=0)


# ------------------------------------------------------------------------------------------------ studies


def test_tune_head_end_to_end_then_a_new_split_reuses_the_cache(setup, tmp_path):
    models = copy_split(setup, tmp_path / "models")
    kw = {"n_trials": 4, "epochs": FAST.max_epochs, "patience": FAST.patience, "batch_size": FAST.batch_size,
          "device": "cpu", "progress": False}
    s = tune_head(setup["cache"], setup["data"], models, **kw)
    assert s["study_name"] == default_study_name(setup["split"].sha256)
    assert s["reached_target"] and s["trials"][0]["params"]["attn_dim"] == 256  # the seed's defaults go first
    assert s["best_trial"]["user_attrs"]["auc"] >= 0.95
    assert s["retrained"]["abs_diff"] < 1e-9  # the saved head is the best trial's head
    params = json.loads((models / "best_head_params.json").read_text())
    assert set(params) >= {"attn_dim", "dropout", "lr", "weight_decay", "frames", "tta_aug", "input_dropout"}
    ckpt = HeadCheckpoint.load(models / BEST_HEAD_FILE)
    assert ckpt.provenance["backbone"] == "test_vit" and ckpt.frames == params["frames"]
    assert ckpt.config["attn_dim"] == params["attn_dim"] and ckpt.params == {k: params[k] for k in ckpt.params}
    assert ckpt.metrics["log_loss"] == pytest.approx(s["best_value"])
    # The temperature is fitted on the validation videos' TTA mean over every cached view (what submit averages).
    with FeatureCache.open(setup["cache"]) as cache:
        variants = list(cache.provenance.variants)
        val = [it.key for it in setup["split"].val if it.key != setup["failed"]]
        x, mask = cache.batch(val, ckpt.frames, variants)
    assert sorted(ckpt.calibration["views"]) == sorted(variants) and len(variants) > 1
    with torch.no_grad():
        z = torch.stack([ckpt.build()(torch.from_numpy(x[:, v]), torch.from_numpy(mask))[0].diff(dim=-1)[:, 0]
                         for v in range(len(variants))], dim=1).double().numpy()
    y = [it.label for it in setup["split"].val if it.key in val]
    expected = fit_calibration(z, y)
    assert ckpt.calibration["temperature"] == pytest.approx(expected["temperature"], rel=1e-3)
    assert ckpt.calibration["log_loss_before"] == pytest.approx(expected["log_loss_before"], rel=1e-4)
    summary = json.loads((models / STUDY_SUMMARY_FILE).read_text())
    assert summary["best_value"] == pytest.approx(s["best_value"])
    assert (models / OPTUNA_DB).is_file() and (models / "optuna_history.png").is_file()
    assert (models / "optuna_importances.png").is_file()
    # The same command again resumes: nothing new to do.
    again = tune_head(setup["cache"], setup["data"], models, **kw)
    assert again["n_trials"] == 4

    out = frame_test(setup["cache"], setup["data"], models, device="cpu", progress=False)
    doc = json.loads((models / "frame_test.json").read_text())
    assert doc["criterion"] == "val_log_loss" and set(doc["results"]) == {"6", "8"}
    losses = {int(k): r["log_loss"] for k, r in doc["results"].items()}
    assert doc["recommended_frames"] == min(losses, key=losses.get) == out["recommended_frames"]

    # `arena split --new-split --seed 7`: the same cache, unchanged, serves the new split; a new study starts.
    cache_bytes = setup["cache"].read_bytes()
    new = make_split(load_dataset(setup["data"]), models, seed=7, new=True)
    s2 = tune_head(setup["cache"], setup["data"], models, **{**kw, "n_trials": 2})
    assert s2["study_name"] == default_study_name(new.sha256) != s["study_name"] and s2["n_trials"] == 2
    assert s2["split_sha256"] == new.sha256 and setup["cache"].read_bytes() == cache_bytes
    # The old study is kept, and refuses the new split under its own name: its trials are of another split.
    with pytest.raises(StudyError, match="different settings .*split_sha256.*another --study-name"):
        tune_head(setup["cache"], setup["data"], models, **{**kw, "study_name": s["study_name"]})


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
    kw = {"study_name": "c", "seed": 5, "config": FAST, "progress": False, "n_startup_trials": 2}
    straight = run_study(store, storage=create_storage(f"journal:{tmp_path / 'a.log'}"), n_trials=3, **kw)
    real, calls = study_mod.train_head, []

    def interrupted_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(study_mod, "train_head", interrupted_second_time)
    url = f"journal:{tmp_path / 'b.log'}"
    with pytest.raises(KeyboardInterrupt):
        run_study(store, storage=create_storage(url), n_trials=3, **kw)
    monkeypatch.setattr(study_mod, "train_head", real)
    resumed = run_study(store, storage=create_storage(url), n_trials=3, **kw)
    done = [t for t in resumed.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert [t.params for t in done] == [t.params for t in straight.trials]
    assert [t.state.name for t in resumed.trials].count("FAIL") == 1


def test_study_with_another_search_space_is_refused(store, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    run_study(store, storage=create_storage(url), n_trials=1, frame_choices=(6,), config=FAST, progress=False)
    with pytest.raises(StudyError, match="different settings .*frame_choices.*another --study-name"):
        run_study(store, storage=create_storage(url), n_trials=2, frame_choices=(6, 8), config=FAST, progress=False)
    # Other ranges (a study of an earlier arena version, say) are refused too, not silently mixed in.
    monkeypatch.setitem(study_mod.SEARCH_SPACE, "lr", ("log_float", (1e-4, 1e-3)))
    with pytest.raises(StudyError, match="different settings .*search_space"):
        run_study(store, storage=create_storage(url), n_trials=2, frame_choices=(6,), config=FAST, progress=False)


# The child records itself as arena.study's Objective does (without importing torch: seconds saved per test).
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
    assert set(worker_identity()) == {"host", "pid", "start"}  # the record the child writes
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


def test_process_liveness_check():
    me = worker_identity()
    assert worker_alive(me)
    assert not worker_alive({**me, "start": (me["start"] or 0) + 1}) or me["start"] is None  # a reused pid


def test_two_workers_share_one_journal(setup, tmp_path):
    models = copy_split(setup, tmp_path / "models")
    journal = tmp_path / "optuna.journal"
    go = tmp_path / "go"
    args = ["tune-head", "--cache", str(setup["cache"]), "--data", str(setup["data"]), "--models", str(models),
            "--storage", f"journal:{journal}", "--n-trials", "6", "--epochs", "3", "--batch-size", "16",
            "--threads", "1", "--device", "cpu", "--study-name", "head"]
    # Each worker imports everything first, then waits for the same signal: the two start their first trial
    # together, so one cannot finish the whole study while the other is still importing torch.
    start = ("import os, pathlib, sys, time\n"
             "import arena.study\n"
             "from arena.cli import main\n"
             f"pathlib.Path({str(tmp_path)!r}, f'ready-{{os.getpid()}}').touch()\n"
             "deadline = time.monotonic() + 120\n"
             f"while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:\n"
             "    time.sleep(0.01)\n"
             "sys.argv = ['arena', *sys.argv[1:]]\n"
             "main()\n")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", start, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="head", storage=create_storage(f"journal:{journal}"))
    pids = {t.user_attrs["worker"]["pid"] for t in study.trials}
    assert pids == {p.pid for p in procs}  # both workers added trials
    assert _finished(study) >= 6 and not any(t.state.name in ("RUNNING", "FAIL") for t in study.trials)
    assert (models / BEST_HEAD_FILE).is_file()


# ------------------------------------------------------------------------------------------------ command


def test_cli_refuses_impossible_options(setup, tmp_path):
    r = CliRunner().invoke(main, ["tune-head", "--data", str(setup["data"]), "--n-trials", "0"])
    assert r.exit_code == 2 and "--n-trials" in r.output
    r = CliRunner().invoke(main, ["tune-head", "--data", str(setup["data"]), "--frames", "0,8"])
    assert r.exit_code == 2 and "1..512" in r.output
    r = CliRunner().invoke(main, ["tune-head", "--data", str(setup["data"]), "--device", "gpu"])
    assert r.exit_code == 2 and "Invalid device (gpu)" in r.output
    r = CliRunner().invoke(main, ["tune-head", "--data", str(setup["data"]), "--batch-size", "0"])
    assert r.exit_code == 2 and "--batch-size" in r.output


def test_cli_reports_user_errors_in_one_line(setup, tmp_path):
    """Errors of the library reach the user as one `Error:` line (exit 1), without a traceback."""
    models = copy_split(setup, tmp_path / "models")
    base = ["tune-head", "--data", str(setup["data"]), "--models", str(models), "--device", "cpu", "--n-trials", "1"]
    cases = [
        (["--cache", str(tmp_path / "missing.h5")], "missing.h5"),
        (["--cache", str(setup["cache"]), "--frames", "6,7"], "frame counts [7] are not in the cache"),
        (["--cache", str(setup["cache"]), "--storage", "redis://"], "cannot open the Optuna storage"),
        (["--cache", str(setup["cache"]), "--storage", "mongo:x"], "Invalid storage (mongo:x)"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--cache", str(setup["cache"]), "--device", "cuda:1"], "no CUDA GPU is visible"))
    for extra, message in cases:
        r = CliRunner().invoke(main, [*base, *extra])
        assert r.exit_code == 1 and "Error:" in r.output and message in r.output, (extra, r.output)
        assert "Traceback" not in r.output


@pytest.mark.slow
@pytest.mark.parametrize("kill_seed", [0])
def test_kill9_during_tune_head_then_rerun_equals_uninterrupted(setup, tmp_path, kill_seed):
    """kill -9 at a seeded random moment, rerun the same command: same trials and best head as a straight run."""
    import random
    import time

    def args(models: Path) -> list[str]:
        return ["tune-head", "--cache", str(setup["cache"]), "--data", str(setup["data"]), "--models", str(models),
                "--n-trials", "4", "--epochs", "4", "--batch-size", "16", "--threads", "1", "--device", "cpu"]

    straight, killed = copy_split(setup, tmp_path / "straight"), copy_split(setup, tmp_path / "killed")
    assert CliRunner().invoke(main, args(straight)).exit_code == 0
    proc = subprocess.Popen([sys.executable, "-m", "arena", *args(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / OPTUNA_DB).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the study exists: trials are about to run
    time.sleep(random.Random(kill_seed).uniform(0.2, 1.5))
    proc.kill()
    assert proc.wait() == -9, "the run finished before the kill; the test needs a shorter delay"
    result = CliRunner().invoke(main, args(killed))
    assert result.exit_code == 0, result.output
    a = json.loads((straight / STUDY_SUMMARY_FILE).read_text())
    b = json.loads((killed / STUDY_SUMMARY_FILE).read_text())
    assert "RUNNING" not in b["states"]
    finished = lambda s: [t for t in s["trials"] if t["state"] in ("COMPLETE", "PRUNED")]  # noqa: E731
    assert [t["params"] for t in finished(b)] == [t["params"] for t in finished(a)]
    assert b["best_value"] == pytest.approx(a["best_value"], rel=1e-6)
    sa = HeadCheckpoint.load(straight / BEST_HEAD_FILE).state_dict
    sb = HeadCheckpoint.load(killed / BEST_HEAD_FILE).state_dict
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key])
