"""Defaults and bounds shared by the options of every command and the library functions behind them (no torch)."""

MAX_FRAMES = 512  # frames per video: the largest count any option accepts
MIN_IMAGE_SIZE = 32  # the smallest square input any backbone is asked for (a backbone may need more: 75 for IRv2)
MAX_IMAGE_SIZE = 1024  # the largest square input
MAX_WORKERS = 64  # decoding processes
DEFAULT_BACKBONE = "inception_resnet_v2.tf_in1k"  # the timm model every command builds unless --backbone says
# Decoded frame sizes. A stream above the budget is downscaled inside the decoder (aspect kept) before any frame
# reaches Python: 24 frames of an 8192x8192 clip held at full size peaked at 11.5 GB. 4096x4096 keeps 4K UHD and
# DCI 4K (8.3-8.8 Mpx) untouched, so face crops still see every pixel of real footage.
FRAME_PIXEL_BUDGET = 4096 * 4096
# Above this (16K UHD, 15360x8640) a stream is refused: FFmpeg's own reference frames alone would take gigabytes.
MAX_STREAM_PIXELS = 15360 * 8640
