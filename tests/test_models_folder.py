"""The models-folder contract: file names, typed checkpoints and the one frame-count resolver."""

from __future__ import annotations

import json
import os

import pytest
import torch

from arena.errors import ArenaError, ModelsError
from arena.model import DetectorHead
from arena.models_folder import (
    BEST_HEAD_FILE,
    FRAME_TEST_FILE,
    DetectorCheckpoint,
    HeadCheckpoint,
    find_finetuned,
    finetuned_name,
    load_torch,
    resolve_frames,
)


def _head(dim: int = 16) -> DetectorHead:
    torch.manual_seed(3)
    head = DetectorHead(dim, attn_dim=8, hidden=12, dropout=0.2, input_dropout=0.1)
    head.set_feature_stats(torch.randn(dim), torch.rand(dim) + 0.5)
    return head


def test_head_checkpoint_round_trip_rebuilds_the_same_head(tmp_path):
    head = _head()
    path = tmp_path / BEST_HEAD_FILE
    HeadCheckpoint(config=head.config(), state_dict=head.state_dict(), frames=8, params={"lr": 1e-3},
                   metrics={"val_auc": 0.9}, provenance={"backbone": "b", "input_size": [32, 32]}).save(path)
    loaded = HeadCheckpoint.load(path)
    assert loaded.frames == 8 and loaded.params == {"lr": 1e-3} and loaded.provenance["backbone"] == "b"
    # Only what a reader uses is written: no duplicate config or feature statistics beside the state dict.
    assert set(torch.load(path, weights_only=True)) == {"format", "config", "state_dict", "frames", "params",
                                                        "metrics", "provenance"}
    x = torch.randn(2, 5, 16)
    rebuilt = loaded.build()
    assert not rebuilt.training
    torch.testing.assert_close(rebuilt(x)[0], head.eval()(x)[0])


def test_head_checkpoint_refuses_other_files_with_the_file_named(tmp_path):
    path = tmp_path / BEST_HEAD_FILE
    torch.save({"format": "something-else", "config": {}}, path)
    with pytest.raises(ModelsError, match=rf"{BEST_HEAD_FILE}: not an arena head checkpoint.*arena tune-head"):
        HeadCheckpoint.load(path)
    head = _head()
    HeadCheckpoint(config={**head.config(), "dim": 32}, state_dict=head.state_dict(), frames=4).save(path)
    with pytest.raises(ModelsError, match="do not fit the head configuration"):
        HeadCheckpoint.load(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelsError, match="cannot be loaded with weights_only=True"):
        HeadCheckpoint.load(path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_runs_code_is_refused_and_the_error_is_an_arena_error(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": _RunsCode()}, path)
    with pytest.raises(ArenaError, match="evil.pt: cannot be loaded with weights_only=True"):
        load_torch(path, rerun="`arena train-full`")


def test_detector_checkpoint_keeps_the_seed_keys_and_rebuilds(tmp_path):
    from arena.model import Detector, create_encoder

    encoder = create_encoder("inception_resnet_v2", pretrained=False, image_size=75, seed=1)
    head = DetectorHead(encoder.feature_dim, attn_dim=8, hidden=8)
    detector = Detector(encoder, head).eval()
    cfg = {"backbone": "inception_resnet_v2", "image_size": 75, "seed": 1, "head": head.config()}
    path = tmp_path / finetuned_name("inception_resnet_v2.tf_in1k")
    assert path.name == "inception_resnet_v2_best.pt"
    DetectorCheckpoint(epoch=3, model_state_dict=detector.state_dict(), config=cfg, val_auc=0.5).save(path)
    assert set(torch.load(path, weights_only=True)) == set(DetectorCheckpoint.KEYS)
    assert find_finetuned(tmp_path) == path
    ckpt = DetectorCheckpoint.load(path)
    assert ckpt.epoch == 3 and ckpt.backbone == "inception_resnet_v2"
    frames = torch.randint(0, 255, (1, 2, 3, 75, 75), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.build()(frames)[0], detector(frames)[0])
    torch.save({"epoch": 1, "model_state_dict": {}, "config": {"image_size": 75}}, path)
    with pytest.raises(ModelsError, match="must name the backbone and the head"):
        DetectorCheckpoint.load(path)


def test_find_finetuned_is_none_without_a_checkpoint(tmp_path):
    assert find_finetuned(tmp_path) is None


def test_resolve_frames_option_then_frame_test_then_default(tmp_path):
    assert resolve_frames(tmp_path) == (24, "default (24; no frame_test.json)")
    assert resolve_frames(tmp_path, 8) == (8, "--frames option")
    (tmp_path / FRAME_TEST_FILE).write_text(json.dumps({"recommended_frames": 32}))
    assert resolve_frames(tmp_path) == (32, str(tmp_path / FRAME_TEST_FILE))
    assert resolve_frames(tmp_path, 48)[0] == 48
    with pytest.raises(ModelsError, match="--frames must be in 1..512"):
        resolve_frames(tmp_path, 0)
    (tmp_path / FRAME_TEST_FILE).write_text(json.dumps({"recommended_frames": 0}))
    with pytest.raises(ModelsError, match="recommended_frames is 0"):
        resolve_frames(tmp_path)
