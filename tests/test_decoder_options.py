"""``--decoder`` and ``--views-on`` wired into ``arena features``, ``submit`` and ``evaluate``, on a CPU machine.

Views made by torch (`arena.tta_tensor`) equal albumentations' bit for bit on four variants and within a level on
``shift_scale_rotate``, so a cache built with ``--views-on device`` has the same features on those four and close
ones on the fifth; its provenance says how it was built, while a cache built the default way stays byte for byte
what it always was. NVDEC itself is covered by test_nvdec.py (a fake PyNvVideoCodec) and tools/gpu_check.py.
"""

from __future__ import annotations

import csv
import filecmp
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _world import BACKBONE, FRAMES, IMAGE_SIZE, World, build_world
from click.testing import CliRunner

import arena.verify
from arena import nvdec
from arena.cache import FeatureCache, Provenance
from arena.cli import main
from arena.clips import ClipDataset
from arena.features import built_with, decoder_provenance
from arena.submit import make_submission
from arena.tta import VARIANTS

DEFAULT_DECODER = {"device": "cpu", "resize": "tensor"}
EXACT = ("original", "hflip", "brightness_up", "brightness_down")  # equal bit for bit (arena.tta_tensor)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    """The machine these tests describe: no CUDA GPU, whatever the one running them has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _features(world: World, cache: Path, *options: str) -> object:
    """``arena features`` of the world's data into ``cache``, as the world's cache was built, plus ``options``."""
    return CliRunner().invoke(main, [
        "features", "--data", str(world.data), "--cache", str(cache), "--frames", str(FRAMES), "--backbone",
        BACKBONE, "--no-pretrained", "--image-size", str(IMAGE_SIZE), "--seed", "0", "--device", "cpu",
        "--workers", "0", *options])


@pytest.fixture(scope="module")
def device_cache(world, tmp_path_factory) -> Path:
    """The world's cache, built with ``--views-on device``."""
    cache = tmp_path_factory.mktemp("views_on_device") / "features.h5"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        res = _features(world, cache, "--views-on", "device")
    assert res.exit_code == 0, res.output
    return cache


def test_provenance_records_only_what_differs_from_the_default(monkeypatch):
    assert decoder_provenance() == decoder_provenance("auto") == DEFAULT_DECODER  # auto: the CPU, here
    assert decoder_provenance("cpu", "device") == DEFAULT_DECODER | {"views_on": "device"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nvdec, "_load", lambda: (object(), ""))  # PyNvVideoCodec imports
    assert decoder_provenance("auto") == {"device": "nvdec", "resize": "tensor"}  # what auto picked
    for decoding in (("cpu", "cpu"), ("nvdec", "cpu"), ("cpu", "device"), ("nvdec", "device")):
        prov = Provenance(backbone="b", weights_source="w", weights_hash="h", input_size=(8, 8), mean=(0.5,),
                          std=(0.5,), interpolation="bilinear-antialias", decoder=decoder_provenance(*decoding),
                          tta={}, variants=("original",), sampling={}, frame_counts=(4,), feature_dim=2,
                          feature_format=1)
        assert built_with(Provenance.from_json(prov.to_json())) == decoding  # what --verify decodes with


def test_views_on_device_cache_matches_the_cpu_views_cache(world, device_cache):
    with FeatureCache.open(world.cache) as ref, FeatureCache.open(device_cache) as ours:
        assert ref.provenance.decoder == DEFAULT_DECODER  # the default cache: no new key
        assert ours.provenance.decoder == DEFAULT_DECODER | {"views_on": "device"}
        assert ours.provenance.diff(ref.provenance) == [
            'decoder: {"device": "cpu", "resize": "tensor", "views_on": "device"} -> {"device": "cpu", "resize": '
            '"tensor"}']
        assert ours.keys == ref.keys and len(ref.keys) == 8
        for key in ref.keys:
            for v in VARIANTS:
                a, mask_a = ref.features(key, FRAMES, v)
                b, mask_b = ours.features(key, FRAMES, v)
                np.testing.assert_array_equal(mask_a, mask_b)
                if v in EXACT:  # the same pixels: the same features
                    np.testing.assert_array_equal(a, b)
                else:  # shift_scale_rotate: pixels at most a level apart on a few values
                    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
                    assert np.abs(a - b).max() <= 5e-3 * np.abs(a).max(), (key, np.abs(a - b).max())  # measured 4e-4


def test_decoder_auto_on_a_cpu_machine_is_the_default_cache_byte_for_byte(world, tmp_path):
    res = _features(world, tmp_path / "auto.h5", "--decoder", "auto")
    assert res.exit_code == 0, res.output
    assert filecmp.cmp(tmp_path / "auto.h5", world.cache, shallow=False)


def test_decoder_nvdec_without_cuda_is_refused_by_both_commands(world, tmp_path):
    res = _features(world, tmp_path / "nvdec.h5", "--decoder", "nvdec")
    assert res.exit_code == 2 and "--decoder nvdec cannot be used: no CUDA GPU is visible" in res.output
    assert not (tmp_path / "nvdec.h5").exists()
    res = CliRunner().invoke(main, ["submit", "--data", str(world.data), "--models", str(world.models), "--out",
                                    str(tmp_path / "sub.csv"), "--decoder", "nvdec"])
    assert res.exit_code == 2 and "--decoder nvdec cannot be used: no CUDA GPU is visible" in res.output
    assert "Use --decoder auto" in res.output


def test_resuming_with_other_views_is_refused_naming_the_field(world, device_cache, tmp_path):
    for cache, options in ((world.cache, ("--views-on", "device")), (device_cache, ())):
        copy = tmp_path / f"resume_{cache.parent.name}.h5"
        shutil.copy(cache, copy)
        before = copy.read_bytes()
        res = _features(world, copy, *options)
        assert res.exit_code == 1, res.output
        assert "was built with another configuration (decoder: " in res.output and '"views_on": "device"' in res.output
        assert copy.read_bytes() == before


def _p_fake(out: Path) -> dict[str, float]:
    with open(out.parent / "predictions_detail.csv", newline="") as fh:
        return {r["filename"]: float(r["p_fake"]) for r in csv.DictReader(fh)}


def test_submit_with_views_on_device_matches_the_default_and_verifies(world, tmp_path):
    runs = {}
    for views in ("cpu", "device"):
        out = tmp_path / views / "PREDICTIONS.CSV"
        res = CliRunner().invoke(main, ["submit", "--data", str(world.data), "--models", str(world.models), "--out",
                                        str(out), "--device", "cpu", "--workers", "0", "--views-on", views,
                                        "--verify", str(world.cache), "--verify-all"])
        assert res.exit_code == 0, res.output
        assert "p_fake from cached features vs full path on 4 videos" in res.output
        assert ("the cache was built with" in res.output) == (views == "device")  # the difference is said
        runs[views] = _p_fake(out)
    assert runs["device"].keys() == runs["cpu"].keys()
    for name, p in runs["cpu"].items():
        assert runs["device"][name] == pytest.approx(p, abs=1e-4)  # measured 1e-5


def test_verify_decodes_as_the_cache_was_built(world, device_cache, tmp_path, monkeypatch):
    """A fine-tuned model's check decodes the sample again: with the cache's --views-on, not the submission's."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("views_on"))
        return ClipDataset(*args, **kwargs)

    monkeypatch.setattr(arena.verify, "ClipDataset", spy)
    result = make_submission(data=world.data, models=world.models_ft, out=tmp_path / "sub.csv", device="cpu",
                             workers=0, verify=device_cache, verify_sample=None, progress=False, echo=None)
    assert seen == ["device"] and result.verify.ok and result.verify.mode == "finetuned"


def test_evaluate_takes_the_options(world, tmp_path):
    res = CliRunner().invoke(main, ["evaluate", "--data", str(world.data), "--models", str(world.models), "--out",
                                    str(tmp_path / "eval.json"), "--device", "cpu", "--workers", "0", "--views-on",
                                    "device"])
    assert res.exit_code == 0, res.output
