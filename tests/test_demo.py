"""Demo dataset generator: layout, decodability, determinism, locality of the manipulation, no global shortcut."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from torchcodec.decoders import VideoDecoder

from arena.cli import main
from arena.demo import DemoConfig, generate_dataset, plan_dataset, write_video
from arena.demo_render import draw_clip_params, render_clip
from arena.errors import OptionError

TINY = dict(n_train_real=3, n_train_fake=3, n_test=4, seconds=1.0, size=(64, 64), fps=8.0, workers=1,
            progress=False)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "data"
    return out, generate_dataset(out, seed=7, **TINY)


def test_layout_counts_and_csvs(tiny):
    out, summary = tiny
    assert len(list((out / "train/real").glob("*.mp4"))) == 3
    assert len(list((out / "train/fake").glob("*.mp4"))) == 3
    assert len(list((out / "test").glob("*.mp4"))) == 4
    train = _read_csv(out / "train_labels.csv")
    assert [set(r) for r in train[:1]] == [{"filename", "label", "original", "method"}]
    assert sorted(r["label"] for r in train) == ["0"] * 3 + ["1"] * 3
    assert all(r["method"] == ("blend" if r["label"] == "1" else "") for r in train)  # the default family
    names = {r["filename"] for r in train if r["label"] == "0"}
    for r in train:  # a fake names the real it was rendered from (paired scenes); a real has no source
        assert (r["original"] in names) if r["label"] == "1" else r["original"] == ""
    for r in train:  # every filename resolves under OUT and sits in the folder of its label
        assert (out / r["filename"]).is_file()
        assert r["filename"].split("/")[1] == ("fake" if r["label"] == "1" else "real")
    public = _read_csv(out / "test_public.csv")
    answers = _read_csv(out / "test_labels.csv")
    assert [set(r) for r in public[:1]] == [{"filename"}]
    assert [r["filename"] for r in public] == [r["filename"] for r in answers]
    assert sorted(r["label"] for r in answers) == ["0", "0", "1", "1"]
    assert all((out / r["filename"]).is_file() and "fake" not in r["filename"] and "real" not in r["filename"]
               for r in public)
    manifest = json.loads((out / "demo_manifest.json").read_text())
    assert len(manifest["clips"]) == 10 and manifest["config"]["seed"] == 7
    assert summary["total_bytes"] == sum(p.stat().st_size for p in out.rglob("*.mp4"))


def test_videos_decode_with_the_configured_geometry(tiny):
    out, _ = tiny
    for path in sorted(out.rglob("*.mp4")):
        dec = VideoDecoder(str(path))
        assert dec.metadata.num_frames == 8, path
        assert (dec.metadata.height, dec.metadata.width) == (64, 64), path
        assert dec.metadata.codec == "h264"
        assert dec.get_frames_at([0, 7]).data.shape == (2, 3, 64, 64)


def test_same_seed_same_bytes_other_seed_other_bytes(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    generate_dataset(again, seed=7, **TINY)
    for path in sorted(out.rglob("*")):
        if path.is_file():
            assert (again / path.relative_to(out)).read_bytes() == path.read_bytes(), path
    other = tmp_path / "other"
    generate_dataset(other, seed=8, **{**TINY, "n_test": 0})
    assert (other / "train/real/real_0001.mp4").read_bytes() != (out / "train/real/real_0001.mp4").read_bytes()


def test_pool_and_in_process_write_the_same_files(tiny, tmp_path):
    out, _ = tiny
    pooled = tmp_path / "pooled"
    generate_dataset(pooled, seed=7, **{**TINY, "workers": 2})
    for path in sorted(out.rglob("*.mp4")):
        assert (pooled / path.relative_to(out)).read_bytes() == path.read_bytes(), path


def test_fake_differs_from_its_pristine_only_inside_the_blend_region():
    for i in range(3):
        params = draw_clip_params(np.random.default_rng(i), size=(64, 80), num_frames=6, difficulty=0.5)
        real, mask = render_clip(params, return_mask=True)
        fake, mask_fake = render_clip(params, fake=True, return_mask=True)
        assert real.shape == fake.shape == (6, 64, 80, 3) and real.dtype == np.uint8
        np.testing.assert_array_equal(mask, mask_fake)
        diff = np.abs(real.astype(np.int16) - fake.astype(np.int16)).max(axis=-1)
        outside = mask == 0
        assert outside.any() and (~outside).any()
        assert diff[outside].max() == 0
        assert diff[mask > 0.5].mean() > 2  # the manipulation is really there
        assert 0.02 < (mask > 0.05).mean() < 0.75  # the visible region incl. its soft edge
        assert 0.05 < (mask > 0.5).mean() < 0.5  # the core: a face-sized region, not the frame
        # the mask drifts a little from frame to frame (temporal flicker), but stays one region
        assert not np.array_equal(mask[0], mask[-1])


def test_no_global_shortcut_in_colour_or_file_size(tmp_path):
    # Paired: each fake against the pristine rendering of the same scene, so scene-to-scene spread (large) does
    # not hide a global cue. The manipulation is local: mean colour moves by a few thousandths at most, and the
    # file shrinks a little only because the blended region lost its grain (as a real swap's region does).
    colour, ratio = [], []
    for i in range(6):
        params = draw_clip_params(np.random.default_rng(50 + i), size=(64, 64), num_frames=8)
        real, fake = render_clip(params), render_clip(params, fake=True)
        colour.append(fake.mean(axis=(0, 1, 2)) / 255 - real.mean(axis=(0, 1, 2)) / 255)
        sizes = [write_video(tmp_path / f"{i}_{k}.mp4", v, 8.0, extra_args=("-threads", "1")).stat().st_size
                 for k, v in enumerate((real, fake))]
        ratio.append(sizes[1] / sizes[0])
    colour = np.array(colour)
    assert np.abs(colour).max() < 0.02, colour
    assert np.abs(colour.mean(axis=0)).max() < 0.01, colour
    assert 0.8 < np.mean(ratio) < 1.1, ratio


def test_fakes_are_made_from_the_scenes_of_reals_when_paired():
    jobs = {j.relpath: j for j in plan_dataset(DemoConfig(n_train_real=2, n_train_fake=3, n_test=5, seed=4))}
    assert jobs["train/fake/fake_0001.mp4"].params == jobs["train/real/real_0001.mp4"].params
    assert jobs["train/fake/fake_0003.mp4"].params != jobs["train/real/real_0002.mp4"].params  # no real to pair
    test = sorted((j for j in jobs.values() if j.relpath.startswith("test/")), key=lambda j: j.relpath)
    reals = [j.params for j in test if j.label == 0]
    fakes = [j.params for j in test if j.label == 1]
    assert fakes == reals[: len(fakes)]
    unpaired = plan_dataset(DemoConfig(n_train_real=2, n_train_fake=2, n_test=4, seed=4, paired=False))
    assert len({j.params for j in unpaired}) == 8


def test_presets_and_validation():
    comp = DemoConfig.from_preset("competition")
    assert (comp.n_train_real, comp.n_train_fake, comp.n_test) == (300, 300, 200)
    assert comp.size == (360, 640) and comp.num_frames == 300
    jobs = plan_dataset(DemoConfig.from_preset("demo", n_test=5, seed=1))
    assert sum(j.label for j in jobs if j.relpath.startswith("test/")) == 2
    with pytest.raises(OptionError, match="Unknown preset 'huge'"):
        DemoConfig.from_preset("huge")
    with pytest.raises(OptionError, match="both even"):
        DemoConfig(size=(65, 64))
    with pytest.raises(OptionError, match="difficulty must be in"):
        DemoConfig(difficulty=1.5)
    with pytest.raises(OptionError, match="Nothing to generate"):
        DemoConfig(n_train_real=0, n_train_fake=0, n_test=0)


def test_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(OptionError, match=r"is not empty.*--force"):
        generate_dataset(tmp_path, **TINY)
    assert (tmp_path / "keep.txt").exists()


def test_cli_demo_data(tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["demo-data", str(out), "--n-train", "1", "--n-test", "2", "--seconds", "0.5",
                                       "--size", "48x32", "--fps", "8", "--workers", "1", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert "wrote 1 real + 1 fake train, 2 test (1 fake) videos, 48x32" in result.output
    dec = VideoDecoder(str(out / "test/test_0001.mp4"))
    assert (dec.metadata.width, dec.metadata.height) == (48, 32)
    again = CliRunner().invoke(main, ["demo-data", str(out)])
    assert again.exit_code == 1 and "Error: " in again.output and "not empty" in again.output
    bad = CliRunner().invoke(main, ["demo-data", str(tmp_path / "x"), "--size", "big"])
    assert bad.exit_code == 2 and "WIDTHxHEIGHT" in bad.output  # a usage error, before anything is written
