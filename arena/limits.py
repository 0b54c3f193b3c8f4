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
# Decode workers (`arena.isolation`). A worker that takes longer than this over one video is killed and the video is
# recorded as failed: a real video decodes in seconds, so only a decoder stuck in a broken stream gets near it.
# ARENA_VIDEO_TIMEOUT (seconds) overrides it.
VIDEO_SECONDS = 600.0
# A worker may grow this share of the machine's memory, divided among the workers, over its size at start (at least
# MIN_WORKER_MEMORY_MB): a runaway decoder is killed before the kernel's out-of-memory killer picks the largest
# process, which is the main one with the model. ARENA_WORKER_MEMORY_MB (per worker) overrides it.
WORKER_MEMORY_SHARE = 0.5
MIN_WORKER_MEMORY_MB = 2048
