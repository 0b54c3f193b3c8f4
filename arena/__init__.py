"""arena: a two-stage video deepfake detector toolkit.

Stages: decode (torchcodec) -> TTA -> backbone features -> HDF5 cache -> tuned attention head,
and an end-to-end fine-tuning path; the submission runs the full-video path.
"""

__version__ = "0.1.0"
