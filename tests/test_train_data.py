"""`arena.train_data`: training clips come from the shared clip pipeline, bit for bit as the seeded recipe says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _layout import write_dataset

from arena.augment import degrade
from arena.data import load_dataset
from arena.train_data import ClipBatch, CollateClips, eval_dataset, limit_items, train_dataset
from arena.tta import train_augment
from arena.video import decode_uniform

SIZE = 32


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> list:
    rng = np.random.default_rng(1)
    videos = ((f"train/{c}/{c}_{i}.mp4", label, rng.integers(0, 255, size=(7, SIZE, SIZE, 3), dtype=np.uint8))
              for label, c in ((0, "real"), (1, "fake")) for i in range(2))
    root = write_dataset(tmp_path_factory.mktemp("clips"), videos)
    good = load_dataset(root, require_test=False).train
    broken = root / "train" / "fake" / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return [*good, type(good[0])("train/fake/broken.mp4", broken, 1, "train")]


def test_a_training_clip_is_the_decoded_clip_augmented_with_a_generator_seeded_by_seed_epoch_index(items):
    ds = train_dataset(items, frames=4, size=(SIZE, SIZE), seed=3)
    for epoch, i in ((1, 0), (2, 0), (1, 3)):
        clip = ds[(epoch, i)]
        want = train_augment(decode_uniform(items[i].path, 4, size=(SIZE, SIZE)).frames,
                             rng=np.random.default_rng([3, epoch, i]))
        assert clip.views.shape == (1, 4, 3, SIZE, SIZE)
        assert torch.equal(clip.views[0], want)
    assert not torch.equal(ds[(1, 0)].views, ds[(2, 0)].views)  # a new draw every epoch
    assert torch.equal(ds[(1, 0)].views, ds[(1, 0)].views)  # and the same draw whenever it is asked again


def test_augment_levels_add_the_degradations_of_the_same_seeded_draw_to_training_clips_only(items):
    plain = train_dataset(items, frames=4, size=(SIZE, SIZE), seed=3)
    strong = train_dataset(items, frames=4, size=(SIZE, SIZE), seed=3, augment="strong")
    rng = np.random.default_rng([3, 2, 1])
    decoded = decode_uniform(items[1].path, 4, size=(SIZE, SIZE)).frames
    want = train_augment(degrade(decoded, "strong", rng.spawn(1)[0]), rng=rng)
    assert torch.equal(strong[(2, 1)].views[0], want)  # the (seed, epoch, index) draw, as a resumed run draws it
    assert torch.equal(strong[(2, 1)].views, strong[(2, 1)].views)
    assert any(not torch.equal(strong[(e, 0)].views, plain[(e, 0)].views) for e in range(1, 4))
    assert eval_dataset(items, frames=4, size=(SIZE, SIZE)).augment is None  # validation: the original view


def test_a_validation_clip_is_the_original_view(items):
    clip = eval_dataset(items, frames=4, size=(SIZE, SIZE))[1]
    assert torch.equal(clip.views[0], decode_uniform(items[1].path, 4, size=(SIZE, SIZE)).frames)


def test_a_broken_video_is_collated_as_a_zero_clip_marked_not_ok_with_the_reason(items):
    ds = train_dataset(items, frames=4, size=(SIZE, SIZE), seed=0)
    batch = CollateClips(4, (SIZE, SIZE))([ds[(0, 0)], ds[(0, 4)]])
    assert isinstance(batch, ClipBatch) and len(batch) == 2
    assert batch.frames.shape == (2, 4, 3, SIZE, SIZE) and batch.frames.dtype == torch.uint8
    assert batch.ok.tolist() == [True, False] and batch.index.tolist() == [0, 4]
    assert batch.label.tolist() == [items[0].label, 1]
    assert not batch.frames[1].any() and batch.valid[1].all()
    assert batch.key[1] == "train/fake/broken.mp4" and "broken.mp4" in batch.message[1]


def test_limit_items_takes_a_seeded_class_balanced_subset_in_key_order():
    class It:
        def __init__(self, key: str, label: int) -> None:
            self.key, self.label = key, label

    items = [It(f"r{i}", 0) for i in range(6)] + [It(f"f{i}", 1) for i in range(3)]
    picked = limit_items(items, 4, seed=0)
    assert [it.label for it in picked].count(0) == 2 and [it.label for it in picked].count(1) == 2
    assert [it.key for it in picked] == sorted(it.key for it in picked)
    assert [it.key for it in limit_items(items, 4, seed=0)] == [it.key for it in picked]
    assert limit_items(items, None, seed=0) == items

