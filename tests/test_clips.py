"""The one clip pipeline: the same decode for the cache, training and submission paths."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from arena.clips import ClipDataset, ClipViews, encode_views
from arena.demo import write_video
from arena.sampling import union_indices
from arena.tta import VARIANTS, tta_views
from arena.video import decode_uniform


@pytest.fixture(scope="module")
def clip_item(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("clips") / "v.mp4"
    write_video(path, rng.integers(0, 255, size=(20, 48, 64, 3), dtype=np.uint8), fps=10, gop=5)
    return SimpleNamespace(key="v.mp4", path=path, label=1)


def test_full_video_path_is_decode_then_the_tta_views(clip_item):
    clip = ClipDataset([clip_item], size=(40, 40), variants=VARIANTS, frames=6)[0]
    ref = decode_uniform(clip_item.path, 6, size=(40, 40))
    assert clip.status == "ok" and clip.label == 1 and clip.index == 0
    assert clip.views.shape == (5, 6, 3, 40, 40)
    torch.testing.assert_close(clip.views, tta_views(ref.frames, VARIANTS), rtol=0, atol=0)
    np.testing.assert_array_equal(clip.frame_indices, ref.frame_indices)


def test_cache_path_decodes_the_union_of_the_frame_counts(clip_item):
    clip = ClipDataset([clip_item], size=(40, 40), variants=("original",), frame_counts=(4, 6))[0]
    np.testing.assert_array_equal(clip.frame_indices, union_indices(clip.num_source_frames, (4, 6)))
    assert clip.views.shape[:2] == (1, len(clip.frame_indices))


def test_training_hook_gets_one_seeded_draw_per_epoch_and_index(clip_item):
    seen = []

    def hook(frames: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        seen.append(int(rng.integers(1 << 30)))
        return frames.flip(-1)

    ds = ClipDataset([clip_item], size=(40, 40), frames=4, augment=hook, seed=5)
    a, _, c = ds[(0, 0)], ds[(0, 0)], ds[(1, 0)]
    assert seen[0] == seen[1] != seen[2]  # same (seed, epoch, index) -> same draw, whichever worker asks
    assert seen[0] == int(np.random.default_rng([5, 0, 0]).integers(1 << 30))
    assert a.views.shape == (1, 4, 3, 40, 40)
    plain = ClipDataset([clip_item], size=(40, 40), frames=4)[0]
    torch.testing.assert_close(a.views, plain.views.flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(a.views, c.views, rtol=0, atol=0)


def test_an_undecodable_video_is_a_failed_clip_not_an_exception(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    clip = ClipDataset([SimpleNamespace(key="bad.mp4", path=bad, label=0)], size=(40, 40), frames=4)[0]
    assert clip.status == "failed" and clip.views is None and not clip.ok
    assert "bad.mp4" in clip.message


def test_clip_views_validate_themselves():
    with pytest.raises(ValueError, match="Invalid status \\(done\\)"):
        ClipViews("k", None, np.zeros(0), np.zeros(0, bool), 0, "done")
    with pytest.raises(ValueError, match="views must be uint8"):
        ClipViews("k", torch.zeros(1, 2, 3, 4, 4), np.zeros(2), np.ones(2, bool), 2, "ok")


def test_encode_views_flattens_views_into_frame_batches():
    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.float().mean(dim=(2, 3))

    views = torch.randint(0, 255, (3, 5, 3, 8, 8), dtype=torch.uint8)
    out = encode_views(Mean(), views, device=torch.device("cpu"), frame_batch=4, precision="fp32")
    assert out.shape == (3, 5, 3)
    torch.testing.assert_close(out, views.float().mean(dim=(3, 4)))
