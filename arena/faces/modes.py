"""The crop mode as the pipeline passes it around: ``none`` (whole frames) or ``faces`` with its settings.

The cache provenance and both checkpoints store it as a dict (`crop_provenance`); every stage that decodes video
turns that dict back into a cropper (`face_cropper`), and the submission refuses a mode other than the model's
(`check_crop_mode`).
"""

from __future__ import annotations

import torch

from arena.errors import OptionError
from arena.faces.stage import FaceCropConfig, FaceCropper

CROP_MODES = ("none", "faces")


def crop_provenance(crop: FaceCropConfig | None) -> dict:
    """``{"mode": "none"}`` or ``{"mode": "faces", ...}`` with the face-crop settings and the detector's version.

    ``max_faces`` is left out: features and models are made from the main track, which does not depend on how many
    tracks are kept; the number of tracks scored is a choice of the submission.
    """
    if crop is None:
        return {"mode": "none"}
    settings = {k: v for k, v in crop.to_dict().items() if k != "max_faces"}
    return {"mode": "faces", **settings}


def crop_config(crop: dict | None, *, max_faces: int = 1) -> FaceCropConfig | None:
    """The config a stored ``crop`` dict describes (None for whole frames), with ``max_faces`` tracks."""
    if not crop or crop.get("mode", "none") == "none":
        return None
    if crop.get("mode") != "faces":
        raise OptionError(f"Invalid crop mode ({crop.get('mode')}). Supported values are {', '.join(CROP_MODES)}.")
    settings = {k: v for k, v in crop.items() if k != "mode"}
    return FaceCropConfig.from_dict({**settings, "max_faces": max_faces})


def face_cropper(crop: dict | FaceCropConfig | None, device: torch.device | str = "cpu", *,
                 max_faces: int = 1) -> FaceCropper | None:
    """The cropper for a stored ``crop`` dict or a config; None for whole frames."""
    config = crop_config(crop, max_faces=max_faces) if isinstance(crop, dict) or crop is None else crop
    return None if config is None else FaceCropper(config, device=device)


def describe(crop: dict | None) -> str:
    """One line: ``none`` or ``faces (mtcnn 2.5.3, margin 1.3, ...)``."""
    if not crop or crop.get("mode", "none") == "none":
        return "none (whole frames)"
    return (f"faces ({crop.get('detector')} {crop.get('detector_version') or ''}, margin {crop.get('margin')}, "
            f"detect size {crop.get('detect_size')}, detect frames {crop.get('detect_frames')})")
