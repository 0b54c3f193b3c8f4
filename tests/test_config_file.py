"""``--config FILE`` on the long commands, and the run record + log each run leaves beside its outputs."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from arena.cli import main
from arena.cli._config import RUNS_DIR, RUNS_SUFFIX
from arena.demo import generate_dataset
from arena.features import extract_features
from arena.run_record import PACKAGES, new_run_files, run_log

LONG_COMMANDS = ("features", "tune-head", "frame-test", "train-full", "submit", "evaluate")
FEATURES_TOML = """\
# the tiny settings of the cache tests
backbone = "test_resnet"
pretrained = false
image-size = 32
frames = [4]
tta = false
seed = 0
workers = 0
device = "cpu"
frame_batch = 16
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("config_demo") / "data"
    generate_dataset(data, n_train_real=2, n_train_fake=2, n_test=2, seconds=0.6, size=(64, 64), fps=10, seed=3,
                     workers=1, progress=False)
    return data


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs with one torch thread, so that two extractions give the same float bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def test_every_long_command_takes_a_config_file():
    for name in LONG_COMMANDS:
        option = next(p for p in main.commands[name].params if p.name == "config")
        assert option.is_eager and not option.expose_value, name


def test_config_drives_features_the_command_line_overrides_it_and_the_record_says_so(demo, tmp_path):
    config = tmp_path / "features.toml"
    config.write_text(FEATURES_TOML + f'data = "{demo}"\ncache = "{tmp_path / "f.h5"}"\n')
    r = CliRunner().invoke(main, ["features", "--config", str(config), "--seed", "1"])
    assert r.exit_code == 0, r.output
    cache = tmp_path / "f.h5"
    runs = tmp_path / f"f.h5{RUNS_SUFFIX}"

    # The cache is the one the library makes with the resolved settings (seed 1 from the command line): the
    # record is beside it, not in it.
    ref = tmp_path / "ref.h5"
    extract_features(data=demo, cache=ref, frame_counts=(4,), tta=False, backbone="test_resnet", pretrained=False,
                     image_size=32, seed=1, device="cpu", workers=0, frame_batch=16)
    assert cache.read_bytes() == ref.read_bytes()

    [rec] = records(runs)
    assert rec["command"] == "features" and rec["exit_status"] == 0 and rec["error"] is None
    o, s = rec["options"], rec["sources"]
    assert (o["seed"], s["seed"]) == (1, "command line")
    assert (o["image_size"], o["frames"], o["tta"], s["image_size"], s["frames"]) == (32, [4], False, "config file",
                                                                                      "config file")
    assert (o["amp"], s["amp"]) == (True, "default")
    assert rec["paths"]["cache"] == str(cache) and rec["paths"]["data"] == str(demo)
    assert rec["config_file"] == {"path": str(config), "sha256": hashlib.sha256(config.read_bytes()).hexdigest()}
    v = rec["versions"]
    assert set(PACKAGES) | {"arena", "python", "ffmpeg"} <= set(v)
    assert v["torch"] == metadata.version("torch") and v["python"] == sys.version.split()[0] and v["ffmpeg"]
    assert rec["machine"]["hostname"] and rec["machine"]["cpu_count"] >= 1 and "git" in rec

    [log] = sorted(runs.glob("*.log"))
    assert log.stem == sorted(runs.glob("*.json"))[0].stem
    text = log.read_text()
    assert "stdout: done 6 (partial 0)" in text and "finished: exit status 0" in text

    # A second run (everything cached already) adds a second pair and leaves the first and the cache alone.
    before = (cache.read_bytes(), sorted(runs.glob("*.json"))[0].read_text())
    r = CliRunner().invoke(main, ["features", "--config", str(config), "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert len(list(runs.glob("*.json"))) == 2 and len(list(runs.glob("*.log"))) == 2
    assert (cache.read_bytes(), sorted(runs.glob("*.json"))[0].read_text()) == before
    assert "skipped (already cached) 6" in sorted(runs.glob("*.log"))[1].read_text()


@pytest.mark.parametrize(
    "toml, expect",
    [
        ('epoch = 3\n', r"unknown key 'epoch' for .*features.*allowed keys: amp, backbone, cache, .*workers\."),
        ('image-size = 3.5\n', r"key 'image-size' \(--image-size\) takes a whole number, not float 3.5"),
        ('image_size = 8\n', r"key 'image_size' \(--image-size\): 8 is not in the range 32<=x<=1024"),
        ('amp = "no"\n', r"key 'amp' \(--amp\) takes true or false"),
        ('frames = "a,b"\n', r"key 'frames' \(--frames\): 'a,b': give comma-separated frame counts"),
        ('seed = 1\nimage-size = 64\nimage_size = 64\n', r"--image-size is already set by key 'image-size'"),
        ('seed = \n', r"not valid TOML \(.*line 2"),
    ],
)
def test_a_bad_config_file_is_refused_naming_the_file_and_the_key(demo, tmp_path, toml, expect):
    config = tmp_path / "bad.toml"
    config.write_text(f'data = "{demo}"\n' + toml)
    r = CliRunner().invoke(main, ["features", "--config", str(config), "--cache", str(tmp_path / "f.h5")])
    assert r.exit_code == 2
    message = " ".join(r.output.split())  # click wraps long messages
    assert f"{config}:" in message
    assert re.search(expect, message), message
    assert not (tmp_path / f"f.h5{RUNS_SUFFIX}").exists() and not (tmp_path / "f.h5").exists()


def test_a_missing_config_file_is_refused(tmp_path):
    r = CliRunner().invoke(main, ["tune-head", "--config", str(tmp_path / "none.toml")])
    assert r.exit_code == 2 and f"{tmp_path / 'none.toml'}: cannot be read" in r.output


def test_tune_head_from_a_config_records_in_the_models_folder(setup, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "split.json").write_bytes((setup["models"] / "split.json").read_bytes())
    config = tmp_path / "tune.toml"
    config.write_text(f'cache = "{setup["cache"]}"\ndata = "{setup["data"]}"\nmodels = "{models}"\nn-trials = 1\n'
                      'epochs = 2\npatience = 1\nbatch_size = 16\ndevice = "cpu"\nthreads = 1\ncv = false\n')
    r = CliRunner().invoke(main, ["tune-head", "--config", str(config)])
    assert r.exit_code == 0, r.output
    [rec] = records(models / RUNS_DIR)
    assert rec["options"]["n_trials"] == 1 and rec["options"]["cv"] is False and rec["sources"]["cv"] == "config file"
    assert rec["sources"]["seed"] == "default" and rec["exit_status"] == 0
    text = next((models / RUNS_DIR).glob("*.log")).read_text()
    assert "stdout: study 'head-" in text and "stdout: best trial #0" in text


def test_a_failing_run_records_its_error_and_repeatable_options_take_arrays(demo, tmp_path):
    config = tmp_path / "submit.toml"
    config.write_text(f'data = "{demo}"\nout = "{tmp_path / "sub" / "P.CSV"}"\ncheckpoint = ["{tmp_path / "a.pt"}"]\n'
                      'verify = "one.h5"\n')
    r = CliRunner().invoke(main, ["submit", "--config", str(config), "--device", "cpu"])
    assert r.exit_code == 1 and "a.pt: checkpoint not found" in r.output
    assert not (tmp_path / "sub").exists()  # refused before any output: no new folder just for the record
    (tmp_path / "sub").mkdir()
    r = CliRunner().invoke(main, ["submit", "--config", str(config), "--device", "cpu"])
    assert r.exit_code == 1 and "a.pt: checkpoint not found" in r.output
    [rec] = records(tmp_path / "sub" / RUNS_DIR)
    assert rec["options"]["checkpoints"] == [str(tmp_path / "a.pt")] and rec["options"]["verify"] == ["one.h5"]
    assert rec["exit_status"] == 1 and "checkpoint not found" in rec["error"]
    text = next((tmp_path / "sub" / RUNS_DIR).glob("*.log")).read_text()
    assert "ERROR arena.run: error: " in text and "finished: exit status 1" in text


def test_evaluate_records_beside_its_json_and_train_full_refuses_a_missing_fold_before_any_folder(demo, tmp_path):
    r = CliRunner().invoke(main, ["evaluate", "--data", str(demo), "--models", str(tmp_path / "typo")])
    assert r.exit_code == 1 and not (tmp_path / "typo").exists()  # no record, no folder for a missing input
    (tmp_path / "m" / "folds").mkdir(parents=True)
    r = CliRunner().invoke(main, ["evaluate", "--data", str(demo), "--models", str(tmp_path / "m" / "folds")])
    assert r.exit_code == 1
    [rec] = records(tmp_path / "m" / RUNS_DIR)  # evaluation.json's folder: the folds folder's parent
    assert rec["exit_status"] == 1 and rec["error"]
    r = CliRunner().invoke(main, ["train-full", "--data", str(demo), "--models", str(tmp_path / "t"), "--fold", "2"])
    assert r.exit_code == 1 and "--fold 2" in r.output
    assert not (tmp_path / "t").exists()


def test_run_log_copies_stdout_and_arena_logs_and_undoes_itself(tmp_path, capsys):
    files = new_run_files(tmp_path, "demo")
    assert new_run_files(tmp_path, "demo").log != files.log  # never an earlier run's name
    logger = logging.getLogger("arena")
    level, handlers, stdout = logger.level, list(logger.handlers), sys.stdout
    with run_log(files.log) as log:
        print("a summary line")
        logging.getLogger("arena.something").info("an info line")
        logging.getLogger("elsewhere").info("not arena")
        log.note("only in the file")
    assert (logger.level, logger.handlers, sys.stdout) == (level, handlers, stdout)
    text = files.log.read_text()
    assert "INFO stdout: a summary line" in text and "INFO arena.something: an info line" in text
    assert "only in the file" in text and "not arena" not in text
    assert capsys.readouterr().out == "a summary line\n"
