"""The attention report: which sampled frames the head looked at, per video, as numbers and a PNG strip.

The frames are decoded again through `arena.clips.ClipDataset` with the prediction's frame count, so the strip
shows exactly the frames (and source indices) the head weighed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arena.clips import ClipDataset
from arena.faces.modes import face_cropper
from arena.predict import LoadedModel, VideoPrediction


def attention_strip(frames: torch.Tensor, weights: np.ndarray, valid: np.ndarray, indices: np.ndarray,
                    out: str | Path, *, title: str) -> Path:
    """PNG of the sampled frames (uint8 ``[T, 3, H, W]``) side by side with each frame's attention weight under it.

    The most-attended frame's label is red; repeated frames (masked out of the attention) are marked.
    """
    import matplotlib  # optional and slow to import: only the attention report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = frames.shape[0]
    cols = min(t, 12)
    rows = (t + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.75 * rows + 0.4), squeeze=False)
    top = float(np.max(weights)) if len(weights) else 0.0
    for i, ax in enumerate(axes.flat):
        if i >= t:
            ax.axis("off")
            continue
        ax.imshow(frames[i].permute(1, 2, 0).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        w = float(weights[i])
        # xlabel (not a title below the image) so tight_layout makes room for it
        ax.set_xlabel(f"frame {int(indices[i])}\nw = {w:.3f}" + ("" if valid[i] else " (repeat)"), fontsize=7,
                      color="crimson" if w == top else "black")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)


def attention_report(
    predictions: Sequence[VideoPrediction], items: Sequence, model: LoadedModel, out_dir: str | Path
) -> list[dict[str, Any]]:
    """Per-frame attention (``original`` variant) and a PNG strip per video, written to ``out_dir``.

    Returns one JSON-able entry per prediction: key, label, p_fake, frame indices, attention, mask and the PNG's
    path (or the error when the video had no prediction).
    """
    out_dir = Path(out_dir)
    item_by_key = {it.key: it for it in items}
    report = []
    faces = face_cropper(model.crop)  # one cropper (one detector) for every reported video
    for pred in predictions:
        entry: dict[str, Any] = {"key": pred.key, "label": pred.label, "p_fake": pred.p_fake}
        if pred.attention is None:
            entry["error"] = pred.error or "no prediction"
            report.append(entry)
            continue
        # The frames the head saw: face crops of the main track when the model crops faces.
        clip = ClipDataset([item_by_key[pred.key]], size=model.encoder.input_size, variants=model.variants[:1],
                           frames=pred.frames_used, faces=faces)[0]
        entry.update(frame_indices=[int(i) for i in pred.frame_indices],
                     attention=[round(float(w), 6) for w in pred.attention], valid=[bool(v) for v in pred.valid])
        if clip.views is not None:
            png = attention_strip(clip.views[0], pred.attention, pred.valid, pred.frame_indices,
                                  out_dir / f"{_safe_name(pred.key)}.png",
                                  title=f"{pred.key}  p_fake={pred.p_fake:.3f}  label={pred.label}")
            entry["png"] = str(png)
        report.append(entry)
    return report
