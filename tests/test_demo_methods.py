"""The demo's manipulation families: blend (the default, pixels pinned), splice and mixed; method/original columns."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from torchcodec.decoders import VideoDecoder

from arena.cli import main
from arena.data import scan_dataset
from arena.demo import DemoConfig, generate_dataset, plan_dataset
from arena.demo_render import draw_clip_params, draw_splice_params, render_clip, render_splice
from arena.errors import OptionError

SMALL = dict(n_train_real=2, n_train_fake=2, n_test=4, seconds=1.0, size=(64, 64), fps=8.0, seed=7)
# sha256 of the rendered pixels of SMALL's clips, computed with the generator as it was before the splice family
# existed: `make demo` and its figures depend on the default family staying the same bytes. Pixels, not the mp4
# files, so that the pin does not depend on the FFmpeg build.
BEFORE_SPLICE = {
    "train/real/real_0002.mp4": "8f773289ec701ddce9eeeea13a1ab6783e142e61a0c83accd0214d3a47896cd8",
    "train/fake/fake_0002.mp4": "a94bb69664d18fa0f7d927515df2905d101086ac608aa2b085de039c5d1875a7",
    "test/test_0003.mp4": "247c5ebc3d363c0a2dc38068b39d8513986774f91bf55802c3095f86c7925f25",  # the first test fake
}


def _pixels(job) -> np.ndarray:
    return render_splice(job.params, job.splice) if job.splice else render_clip(job.params, fake=bool(job.label))


def _checkerboard(clip: np.ndarray, where: np.ndarray) -> float:
    """Strength of the period-2 pattern (along x plus along y) of the grey level over the pixels ``where``."""
    grey = clip.mean(axis=-1)
    sign_y = np.where(np.arange(clip.shape[1]) % 2 == 0, 1.0, -1.0)[:, None]
    sign_x = np.where(np.arange(clip.shape[2]) % 2 == 0, 1.0, -1.0)
    return abs((grey * sign_x)[where].mean()) + abs((grey * sign_y)[where].mean())


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("methods", [{}, {"test_fake_method": "mixed"}, {"fake_method": "mixed"}])
def test_the_default_family_renders_the_same_pixels_as_before(methods):
    # mixed starts with blend, so the first fake of each set is a blend fake in every one of these plans
    jobs = {j.relpath: j for j in plan_dataset(DemoConfig(**SMALL, **methods))}
    for rel, digest in BEFORE_SPLICE.items():
        if rel == "train/fake/fake_0002.mp4" and methods.get("fake_method") == "mixed":
            assert jobs[rel].method == "splice"  # the second training fake of a mixed set
            continue
        assert jobs[rel].method == ("blend" if jobs[rel].label else "")
        assert hashlib.sha256(_pixels(jobs[rel]).tobytes()).hexdigest() == digest, rel


def test_plans_give_each_fake_a_family_and_keep_every_scene():
    config = dict(n_train_real=4, n_train_fake=4, n_test=8, seed=3)
    blend = plan_dataset(DemoConfig(**config))
    mixed = plan_dataset(DemoConfig(**config, fake_method="mixed"))
    held_out = plan_dataset(DemoConfig(**config, test_fake_method="mixed"))
    splice = plan_dataset(DemoConfig(**config, fake_method="splice"))
    for plan in (mixed, held_out, splice):  # scenes, labels and sources never depend on the families
        assert [(j.relpath, j.label, j.params, j.original) for j in plan] == \
               [(j.relpath, j.label, j.params, j.original) for j in blend]
    for plan in (blend, mixed, held_out, splice):
        for j in plan:
            assert (j.method != "") == bool(j.label) and (j.splice is not None) == (j.method == "splice")

    def families(plan, prefix):
        return [j.method for j in plan if j.label == 1 and j.relpath.startswith(prefix)]

    assert families(blend, "train/") == families(blend, "test/") == ["blend"] * 4
    assert families(mixed, "train/") == families(mixed, "test/") == ["blend", "splice"] * 2
    assert families(held_out, "train/") == ["blend"] * 4 and families(held_out, "test/") == ["blend", "splice"] * 2
    assert families(splice, "train/") == ["splice"] * 4
    donors = [j.splice.donor for j in splice if j.splice is not None]
    assert len(set(donors)) == len(donors) and not set(donors) & {j.params for j in splice}  # donors: not in the set
    # a splice fake's donor is the same whatever the other fakes are (its own seed stream)
    assert [j.splice for j in mixed if j.relpath.startswith("test/") and j.splice] == \
           [j.splice for j in held_out if j.relpath.startswith("test/") and j.splice]


def test_splice_fakes_are_local_with_the_colour_of_their_scene():
    # Against the pristine rendering of the same scene: unchanged outside the mask, another scene inside it, the
    # colour transferred (frame means move by a few thousandths), and the generator's period-2 pattern present.
    for i in range(4):
        params = draw_clip_params(np.random.default_rng(50 + i), size=(64, 64), num_frames=8)
        splice = draw_splice_params(np.random.default_rng(80 + i), size=(64, 64), num_frames=8)
        real = render_clip(params).astype(np.float32) / 255
        fake, mask = render_splice(params, splice, return_mask=True)
        assert fake.shape == (8, 64, 64, 3) and fake.dtype == np.uint8
        np.testing.assert_array_equal(mask, render_clip(params, return_mask=True)[1])  # the blend family's region
        fake = fake.astype(np.float32) / 255
        diff = np.abs(fake - real).max(axis=-1)
        assert diff[mask == 0].max() == 0
        core = mask > 0.5
        assert diff[core].mean() > 20 / 255  # foreign content, not a copy of the scene
        assert np.abs(fake.mean(axis=(0, 1, 2)) - real.mean(axis=(0, 1, 2))).max() < 0.01
        w = mask[..., None]
        region = ((fake - real) * w).sum(axis=(0, 1, 2)) / w.sum()
        assert np.abs(region).max() < 0.05, region  # colour-transferred: no colour cast even in the region
        assert _checkerboard(fake, core) > 5 * _checkerboard(real, core) + 0.005  # the generator's pattern


def test_render_splice_refuses_a_donor_of_another_geometry():
    params = draw_clip_params(np.random.default_rng(0), size=(64, 64), num_frames=4)
    other = draw_splice_params(np.random.default_rng(1), size=(64, 64), num_frames=5)
    with pytest.raises(ValueError, match="same size and num_frames"):
        render_splice(params, other)


@pytest.fixture(scope="module")
def mixed_set(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo_methods") / "data"
    summary = generate_dataset(out, **{**SMALL, "n_test": 6}, fake_method="splice", test_fake_method="mixed",
                               workers=1, progress=False)
    return out, summary


def test_mixed_set_records_family_and_source_of_every_fake(mixed_set):
    out, summary = mixed_set
    train, answers = _read_csv(out / "train_labels.csv"), _read_csv(out / "test_labels.csv")
    assert list(train[0]) == list(answers[0]) == ["filename", "label", "original", "method"]
    assert [(r["label"], r["method"]) for r in train] == [("0", ""), ("0", ""), ("1", "splice"), ("1", "splice")]
    assert [r["method"] for r in answers if r["label"] == "1"] == ["blend", "splice", "blend"]
    assert all(r["method"] == "" and r["original"] == "" for r in answers if r["label"] == "0")
    assert summary["fakes_by_method"] == {"blend": 2, "splice": 3}
    # `original` is the real whose scene the fake keeps, for both families
    clips = {c["filename"]: c for c in json.loads((out / "demo_manifest.json").read_text())["clips"]}
    for row in train + answers:
        clip = clips[row["filename"]]
        assert clip["method"] == row["method"] and ("splice" in clip) == (row["method"] == "splice")
        if row["label"] == "1":
            source = clips[row["original"]]
            assert source["label"] == 0 and source["params"] == clip["params"]
    assert summary["total_bytes"] == sum(p.stat().st_size for p in out.rglob("*.mp4"))
    splice_test = next(r["filename"] for r in answers if r["method"] == "splice")
    assert VideoDecoder(str(out / splice_test)).get_frames_at([0, 7]).data.shape == (2, 3, 64, 64)


def test_the_layout_scan_takes_the_method_column_in_its_stride(mixed_set):
    out, _ = mixed_set
    dataset = scan_dataset(out)
    assert dataset.report.ok and not dataset.report.warnings
    assert dataset.group_column == "original"
    assert dataset.report.counts == {"train_real": 2, "train_fake": 2, "test": 6, "skipped": 0}


def test_cli_fake_method_and_validation(tmp_path):
    out = tmp_path / "cli"
    args = ["demo-data", str(out), "--n-train", "1", "--n-test", "2", "--seconds", "0.5", "--size", "32x32", "--fps",
            "8", "--workers", "1", "--fake-method", "splice", "--test-fake-method", "blend"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "(fakes: 1 blend, 1 splice)" in result.output
    assert [r["method"] for r in _read_csv(out / "train_labels.csv")] == ["", "splice"]
    bad = CliRunner().invoke(main, ["demo-data", str(tmp_path / "x"), "--fake-method", "gan"])
    assert bad.exit_code == 2 and "'gan' is not one of 'blend', 'splice', 'mixed'" in bad.output
    with pytest.raises(OptionError, match="Unknown test_fake_method 'gan'. Supported values are blend, splice, mixed"):
        DemoConfig(test_fake_method="gan")
