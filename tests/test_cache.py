"""Feature cache: round trip, frame selection, resume, kill -9 safety, lock, provenance, damage, shards."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from arena.cache import (
    FEATURE_FORMAT,
    CacheError,
    CacheWriter,
    FeatureCache,
    Provenance,
    merge_shards,
    parse_shard,
    shard_items,
    shard_path,
)
from arena.cache import layout as layout_mod
from arena.cache import writer as writer_mod
from arena.errors import OptionError
from arena.sampling import sampling_spec, uniform_indices, union_indices

VARIANTS = ("original", "hflip", "shift_scale_rotate", "brightness_up", "brightness_down")
DIM = 6


def make_prov(**changes) -> Provenance:
    fields = dict(
        backbone="test_vit", weights_source="random:seed=0", weights_hash="ab" * 32, input_size=(96, 96),
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear-antialias",
        decoder={"device": "cpu", "resize": "tensor"}, tta={"shift": 0.05, "brightness": 0.1}, variants=VARIANTS,
        sampling=sampling_spec(), frame_counts=(24, 32, 48), feature_dim=DIM, feature_format=FEATURE_FORMAT,
    )
    fields.update(changes)
    return Provenance(**fields)


def frame_features(key: str, n: int, indices: np.ndarray) -> np.ndarray:
    """Synthetic features [V, U, d] that identify (video, variant, frame index): checks pick the right rows."""
    seed = sum(map(ord, key)) * 1000 + n
    base = np.random.default_rng(seed).standard_normal((len(VARIANTS), n, DIM)).astype(np.float16)
    return base[:, indices]


# The kill test's child writes exactly these videos; the in-process tests reuse them.
VIDEOS = [(f"train/{'real' if i % 2 else 'fake'}/v{i:02d}.mp4", 5 + (i * 37) % 290) for i in range(14)]


def write_video(writer: CacheWriter, i: int) -> None:
    key, n = VIDEOS[i]
    if i % 7 == 3:
        writer.write_failure(key, label=i % 2, message=f"could not decode {key}")
        return
    idx = union_indices(n, writer.provenance.frame_counts)
    writer.write(key, features=frame_features(key, n, idx), frame_indices=idx, num_source_frames=n,
                 label=None if i % 5 == 4 else i % 2, status="partial" if i % 6 == 5 else "ok",
                 message="short" if i % 6 == 5 else "")


def build(path: Path, indices=range(len(VIDEOS)), **kw) -> Path:
    with CacheWriter(path, make_prov(), **kw) as w:
        for i in indices:
            if VIDEOS[i][0] not in w.done_keys():
                write_video(w, i)
    return path


def test_union_indices_and_shard_helpers():
    u = union_indices(300, (24, 32, 48))
    assert np.all(np.diff(u) > 0) and len(u) < 104
    for k in (24, 32, 48):
        assert set(uniform_indices(300, k)) <= set(u)
    assert union_indices(10, (24, 32, 48)).tolist() == list(range(10))
    assert shard_path("/a/cache.h5", 1, 4) == Path("/a/cache.shard-1-of-4.h5")
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "1/0", "x", "1/2/3"):
        with pytest.raises(OptionError, match="0 <= i"):
            parse_shard(bad)
    assert shard_items(["c", "a", "b"], 0, 2) == ["c", "b"] and shard_items(["c", "a", "b"], 1, 2) == ["a"]


def test_round_trip(tmp_path):
    path = build(tmp_path / "c.h5")
    assert not (tmp_path / "c.h5.parts").exists()  # compacted on close
    with FeatureCache.open(path, expect=make_prov()) as c:
        assert c.provenance == make_prov()
        failed = {VIDEOS[i][0] for i in range(len(VIDEOS)) if i % 7 == 3}
        assert c.keys == sorted(k for k, _ in VIDEOS if k not in failed)
        assert set(c.failures()) == failed
        for i, (key, n) in enumerate(VIDEOS):
            if key in failed:
                continue
            assert c.label(key) == (None if i % 5 == 4 else i % 2)
            assert c.status(key) == ("partial" if i % 6 == 5 else "ok")
            assert c.num_source_frames(key) == n


@pytest.mark.parametrize("n", [300, 10])
@pytest.mark.parametrize("k", [24, 32, 48])
def test_features_are_the_rows_of_linspace(tmp_path, n, k):
    key = "train/real/a.mp4"
    with CacheWriter(tmp_path / "c.h5", make_prov()) as w:
        idx = union_indices(n, (24, 32, 48))
        w.write(key, features=frame_features(key, n, idx), frame_indices=idx, num_source_frames=n, label=0)
    with FeatureCache.open(tmp_path / "c.h5") as c:
        want_idx = np.linspace(0, n - 1, k).astype(np.int64)
        full = frame_features(key, n, np.arange(n))
        for v, name in enumerate(VARIANTS):
            feats, mask = c.features(key, k, name)
            assert feats.dtype == np.float16 and feats.shape == (k, DIM)
            np.testing.assert_array_equal(feats, full[v, want_idx])
        first = np.array([i == 0 or want_idx[i] != want_idx[i - 1] for i in range(k)])
        np.testing.assert_array_equal(mask, first)
        assert mask.all() == (n >= k)
        batch, bmask = c.batch([key, key], k, ["hflip", 0])
        assert batch.shape == (2, 2, k, DIM)
        np.testing.assert_array_equal(batch[1, 0], full[1, want_idx])
        np.testing.assert_array_equal(batch[0, 1], full[0, want_idx])
        np.testing.assert_array_equal(bmask[0], first)


def test_batch_equals_features_across_main_and_staged_parts(tmp_path):
    path = build(tmp_path / "c.h5", range(6))
    w = CacheWriter(path, make_prov())
    for i in range(6, len(VIDEOS)):
        write_video(w, i)
    with FeatureCache.open(path) as c:  # half compacted, half staged: one cache to the reader
        assert len(c.keys) == len(VIDEOS) - 2
        batch, mask = c.batch(c.keys, 32)
        for j, key in enumerate(c.keys):
            for v in range(len(VARIANTS)):
                f, m = c.features(key, 32, v)
                np.testing.assert_array_equal(batch[j, v], f)
                np.testing.assert_array_equal(mask[j], m)
    w.close()


def test_uncovered_frame_count_is_refused(tmp_path):
    path = build(tmp_path / "c.h5")
    with FeatureCache.open(path) as c:
        with pytest.raises(CacheError, match="cannot serve k=40"):
            c.features(VIDEOS[6][0], 40)
        with pytest.raises(CacheError, match="failed during feature extraction"):
            c.features(VIDEOS[3][0], 24)
    with pytest.raises(CacheError, match="cannot serve k=40"):
        FeatureCache.open(path, expect=make_prov(frame_counts=(24, 40)))
    FeatureCache.open(path, expect=make_prov(frame_counts=(24,), variants=("original",))).close()  # a subset serves


def test_valid_rows_shape_the_mask(tmp_path):
    key, n = "a.mp4", 60
    idx = union_indices(n, (24, 32, 48))
    valid = idx < 30  # the decoder had to fill the second half
    with CacheWriter(tmp_path / "c.h5", make_prov()) as w:
        w.write(key, features=frame_features(key, n, idx), frame_indices=idx, num_source_frames=n, label=1,
                status="partial", message="only 30 frames decoded", valid=valid)
    with FeatureCache.open(tmp_path / "c.h5") as c:
        _, mask = c.features(key, 24)
        np.testing.assert_array_equal(mask, uniform_indices(n, 24) < 30)
        assert c.partials() == {key: "only 30 frames decoded"}


def test_resume_and_failed_videos(tmp_path):
    path = tmp_path / "c.h5"
    build(path, range(5))
    with CacheWriter(path, make_prov()) as w:
        assert w.done_keys() == {VIDEOS[i][0] for i in range(5)}
        assert VIDEOS[3][0] not in w.done_keys(retry_failed=True)
        with pytest.raises(ValueError, match="already in"):
            write_video(w, 0)
        idx = union_indices(VIDEOS[3][1], (24, 32, 48))  # the retried failure now succeeds and replaces the record
        w.write(VIDEOS[3][0], features=frame_features(VIDEOS[3][0], VIDEOS[3][1], idx), frame_indices=idx,
                num_source_frames=VIDEOS[3][1], label=1)
        for i in range(5, len(VIDEOS)):
            write_video(w, i)
        assert w.counts()["failed"] == 1
    with FeatureCache.open(path) as c:
        assert VIDEOS[3][0] in c.keys and set(c.failures()) == {VIDEOS[10][0]}


def test_write_validation(tmp_path):
    with CacheWriter(tmp_path / "c.h5", make_prov()) as w:
        idx = union_indices(100, (24,))
        good = frame_features("k", 100, idx)
        with pytest.raises(ValueError, match="features must be float"):
            w.write("k", features=good[:2], frame_indices=idx, num_source_frames=100, label=0)
        with pytest.raises(ValueError, match="strictly increasing"):
            w.write("k", features=good, frame_indices=idx[::-1], num_source_frames=100, label=0)
        with pytest.raises(ValueError, match="NaN"):
            w.write("k", features=good * np.nan, frame_indices=idx, num_source_frames=100, label=0)
        with pytest.raises(ValueError, match="Invalid status"):
            w.write("k", features=good, frame_indices=idx, num_source_frames=100, label=0, status="failed")
        assert w.done_keys() == set()


def test_interrupted_run_gives_the_same_bytes(tmp_path):
    ref = build(tmp_path / "ref.h5")
    path = tmp_path / "c.h5"
    w = CacheWriter(path, make_prov())
    for i in range(8):
        write_video(w, i)
    w.abandon()  # as if killed: no compaction, only staged parts
    with FeatureCache.open(path) as c:
        assert len(c.keys) + len(c.failures()) == 8
    build(path)
    assert filecmp.cmp(ref, path, shallow=False)


def test_crash_during_compaction(tmp_path, monkeypatch):
    ref = build(tmp_path / "ref.h5")
    path = tmp_path / "c.h5"
    build(path, range(4))
    before = path.read_bytes()
    real_write = writer_mod.write_compacted

    def half_write(out, prov, entries):  # dies after writing part of the new file
        real_write(out, prov, list(entries)[:2])
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_mod, "write_compacted", half_write)
    with pytest.raises(KeyboardInterrupt):
        build(path, range(9))
    assert path.read_bytes() == before and not temporaries(tmp_path)  # old file intact, half file gone
    monkeypatch.setattr(writer_mod, "write_compacted", real_write)

    def die_before_dropping_parts(target):  # new file in place, parts not yet removed: duplicates of the same data
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_mod, "drop_parts", die_before_dropping_parts)
    with pytest.raises(KeyboardInterrupt):
        CacheWriter(path, make_prov()).close()
    assert path.read_bytes() != before and (tmp_path / "c.h5.parts").is_dir()
    monkeypatch.undo()
    with FeatureCache.open(path) as c:
        assert len(c.keys) + len(c.failures()) == 9
    build(path)
    assert not temporaries(tmp_path) and not (tmp_path / "c.h5.parts").exists()
    assert filecmp.cmp(ref, path, shallow=False)


def temporaries(folder: Path) -> list[Path]:
    """Temporary files of `arena._files.atomic_write` (and of earlier releases) left in ``folder``."""
    return sorted(folder.glob(".*.tmp")) + sorted(folder.glob("*.tmp"))


CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path[:0] = [{tests!r}, {root!r}]
    import test_cache as t
    from arena.cache import CacheWriter, layout

    slow = float(sys.argv[2])
    real = layout.Entry.features
    def slow_features(self):  # stretch compaction so that random kills land inside it too
        time.sleep(slow / 2)
        return real(self)
    layout.Entry.features = slow_features
    print("ready", flush=True)
    with CacheWriter(sys.argv[1], t.make_prov()) as w:
        for i in range(len(t.VIDEOS)):
            if t.VIDEOS[i][0] not in w.done_keys():
                t.write_video(w, i)
                print("wrote", t.VIDEOS[i][0], flush=True)
                time.sleep(slow)
    print("closed", flush=True)
    """
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill9_at_random_moments_then_resume(tmp_path, seed):
    ref = build(tmp_path / "ref.h5")
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent), root=str(Path(__file__).parents[1])))
    path = tmp_path / "c.h5"
    rng, slow = random.Random(seed), 0.02
    survived: set[str] = set()
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(slow)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, slow * 1.5 * len(VIDEOS)))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        survived |= {line.split()[1] for line in out.splitlines() if line.startswith("wrote")}
        try:
            c = FeatureCache.open(path)
        except CacheError as exc:  # killed before the first video was staged: nothing to lose
            assert not survived and "No feature cache" in str(exc)
            continue
        with c:  # opens, and every video whose write() returned is there
            assert survived <= set(c.keys) | set(c.failures())
    done = subprocess.run([sys.executable, str(script), str(path), "0"], capture_output=True, text=True, check=True)
    assert done.stdout.rstrip().endswith("closed")
    assert filecmp.cmp(ref, path, shallow=False)
    assert not (tmp_path / "c.h5.parts").exists() and not temporaries(tmp_path)


def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "c.h5"
    with CacheWriter(path, make_prov()):
        with pytest.raises(CacheError, match=rf"being written by another process \(pid {os.getpid()}\)"):
            CacheWriter(path, make_prov())
    CacheWriter(path, make_prov()).close()  # the lock goes with the writer


def test_provenance_mismatch_is_refused(tmp_path):
    path = build(tmp_path / "c.h5", range(3))
    other = make_prov(backbone="resnet18", weights_hash="ff" * 32)
    with pytest.raises(CacheError, match=r"backbone: \"test_vit\" -> \"resnet18\".*weights_hash.*Delete it"):
        CacheWriter(path, other)
    with pytest.raises(CacheError, match=r"backbone.*arena features --cache"):
        FeatureCache.open(path, expect=other)
    with pytest.raises(CacheError, match="frame_counts"):
        CacheWriter(path, make_prov(frame_counts=(16,)))
    w = CacheWriter(tmp_path / "staged.h5", make_prov())  # staged parts carry the provenance too
    write_video(w, 0)
    w.abandon()
    with pytest.raises(CacheError, match="input_size"):
        CacheWriter(tmp_path / "staged.h5", make_prov(input_size=(75, 75)))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "other_hdf5"])
def test_damaged_cache_file_gives_a_clear_error(tmp_path, damage):
    path = build(tmp_path / "c.h5", range(4))
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        import h5py

        path.unlink()
        with h5py.File(path, "w") as fh:
            fh["x"] = np.zeros(3)
    for attempt in (lambda: FeatureCache.open(path), lambda: CacheWriter(path, make_prov())):
        with pytest.raises(CacheError, match=rf"{path}.*(arena features --cache|make features)"):
            attempt()
    assert not path.with_name("c.h5.parts").exists()  # the writer did not start over on top of it


def test_shards_read_as_one_and_merge_to_the_single_process_bytes(tmp_path):
    single = build(tmp_path / "single.h5")
    base = tmp_path / "c.h5"
    keys = [k for k, _ in VIDEOS]
    for s in range(3):
        mine = set(shard_items(keys, s, 3))
        build(base, [i for i, (k, _) in enumerate(VIDEOS) if k in mine], shard=(s, 3))
    shards = [shard_path(base, s, 3) for s in range(3)]
    glob = str(tmp_path / "c.shard-*")
    with FeatureCache.open(single) as one, FeatureCache.open(base) as found, FeatureCache.open(glob) as g:
        assert found.paths == shards and g.paths == shards
        assert found.keys == one.keys and found.failures() == one.failures()
        np.testing.assert_array_equal(found.batch(found.keys, 48)[0], one.batch(one.keys, 48)[0])
    merged = merge_shards(tmp_path / "merged.h5", shards)
    merged.close()
    assert filecmp.cmp(single, tmp_path / "merged.h5", shallow=False)
    with pytest.raises(CacheError, match="already exists"):
        merge_shards(tmp_path / "merged.h5", shards)
    # overlapping shards with the same data are fine; with different data they are refused
    FeatureCache.open([single, *shards]).close()
    shards[2].unlink()
    with pytest.raises(CacheError, match=r"shards \[2\] of 3 are missing"):
        FeatureCache.open(base)
    with CacheWriter(tmp_path / "x.h5", make_prov()) as w:
        key, n = VIDEOS[0]
        idx = union_indices(n, (24, 32, 48))
        w.write(key, features=frame_features(key, n, idx) + 1, frame_indices=idx, num_source_frames=n, label=1)
    with pytest.raises(CacheError, match="with different data"):
        FeatureCache.open([single, tmp_path / "x.h5"])
    build(tmp_path / "y.h5", range(1, 2), shard=None)
    with CacheWriter(tmp_path / "z.h5", make_prov(weights_hash="00" * 32)):
        pass
    with pytest.raises(CacheError, match="weights_hash"):
        FeatureCache.open([tmp_path / "y.h5", tmp_path / "z.h5"])


def test_cli_info_and_merge(tmp_path):
    from click.testing import CliRunner

    from arena.cli import main

    base = tmp_path / "c.h5"
    for s in range(2):
        build(base, [i for i in range(len(VIDEOS)) if i % 2 == s], shard=(s, 2))
    runner = CliRunner()
    res = runner.invoke(main, ["cache", "merge", str(tmp_path / "m.h5"), str(tmp_path / "c.shard-*")])
    assert res.exit_code == 0, res.output
    assert "14 videos (ok 10, partial 2, failed 2)" in res.output
    res = runner.invoke(main, ["cache", "info", str(tmp_path / "m.h5"), str(base)])
    assert res.exit_code == 0, res.output
    assert res.output.count("videos: 14 (ok 10, partial 2, failed 2)") == 2
    assert 'backbone: "test_vit"' in res.output and "failed: train/fake/v10.mp4: could not decode" in res.output
    (tmp_path / "bad.h5").write_bytes(b"not a cache")
    res = runner.invoke(main, ["cache", "info", str(tmp_path / "bad.h5")])
    assert res.exit_code != 0 and "arena features --cache" in res.output


def test_empty_run_and_leftover_empty_parts_folder(tmp_path):
    path = tmp_path / "c.h5"
    (tmp_path / "c.h5.parts").mkdir()  # a kill right after creating the folder, before anything was staged
    (tmp_path / "c.h5.parts" / ".x.npz.tmp-1").write_bytes(b"half")
    with pytest.raises(CacheError, match="No feature cache"):
        FeatureCache.open(path)
    CacheWriter(path, make_prov()).close()
    assert not (tmp_path / "c.h5.parts").exists()
    with FeatureCache.open(path, expect=make_prov()) as c:
        assert c.keys == [] and c.failures() == {}
        assert c.batch([], 24)[0].shape == (0, len(VARIANTS), 24, DIM)


# ---------------------------------------------------------------------------------------------------------------------
# Caches written by format 1 (the release before provenance stopped naming the split and arena's version)


class V1Provenance(Provenance):
    """Writes provenance as format 1 did: with split_sha256 / arena_version, the backbone's nominal interpolation,
    and without decoder / sampling / feature_format."""

    def to_json(self) -> str:
        data = {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("decoder", "sampling", "feature_format")}
        data.update(interpolation="bicubic", arena_version="0.1.0", split_sha256="cd" * 32)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


def build_v1(path: Path, indices=range(len(VIDEOS)), *, compact: bool = True) -> Path:
    """A cache as the format-1 release wrote it (compacted, or only staged parts as after a kill)."""
    fields = {f.name: getattr(make_prov(), f.name) for f in dataclasses.fields(Provenance)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layout_mod, "FORMAT_VERSION", 1)
        mp.setattr(writer_mod, "FORMAT_VERSION", 1)
        w = CacheWriter(path, V1Provenance(**fields))
        for i in indices:
            write_video(w, i)
        w.close() if compact else w.abandon()
    return path


def test_v1_cache_opens_and_is_used_unchanged(tmp_path):
    path = build_v1(tmp_path / "v1.h5")
    with h5py.File(path, "r") as fh:  # it really is a format-1 file
        assert fh.attrs["format_version"] == 1 and "provenance.split_sha256" in fh.attrs
        assert "decoder" not in json.loads(fh.attrs["provenance"])
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    with FeatureCache.open(path, expect=make_prov()) as c:  # the dropped fields are ignored, the new ones filled
        assert c.provenance == make_prov()
        with FeatureCache.open(build(tmp_path / "v2.h5")) as new:
            assert c.keys == new.keys
            np.testing.assert_array_equal(c.batch(c.keys, 32)[0], new.batch(new.keys, 32)[0])
    with CacheWriter(path, make_prov()) as w:  # a rerun that finds nothing to do leaves the file alone
        assert w.done_keys() == {k for k, _ in VIDEOS}
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    with pytest.raises(CacheError, match=r"decoder: .*\"resize\": \"tensor\".*-> .*\"decoder\""):
        FeatureCache.open(path, expect=make_prov(decoder={"device": "cpu", "resize": "decoder"}))
    with pytest.raises(CacheError, match=r"interpolation: .*arena features --cache"):
        FeatureCache.open(path, expect=make_prov(interpolation="bicubic"))


def test_v1_staged_parts_resume_to_the_current_bytes(tmp_path):
    """A format-1 run killed midway (main file + staged parts of the old format) resumes with the current code and
    compacts to the bytes of an uninterrupted current run."""
    ref = build(tmp_path / "ref.h5")
    path = build_v1(tmp_path / "c.h5", range(4))
    build_v1(path, range(4, 8), compact=False)
    assert (tmp_path / "c.h5.parts").is_dir()
    with FeatureCache.open(path, expect=make_prov()) as c:
        assert len(c.keys) + len(c.failures()) == 8
    build(path)
    assert filecmp.cmp(ref, path, shallow=False)
    with h5py.File(path, "r") as fh:
        assert fh.attrs["format_version"] == layout_mod.FORMAT_VERSION == 2
        assert not any("split_sha256" in name or "arena_version" in name for name in fh.attrs)


def test_cache_from_a_newer_format_is_refused_with_the_rebuild_command(tmp_path):
    path = build(tmp_path / "c.h5", range(2))
    with h5py.File(path, "r+") as fh:
        fh.attrs["format_version"] = 3
    with pytest.raises(CacheError, match=r"format version 3; this arena reads versions 1, 2.*arena features --cache"):
        FeatureCache.open(path)
