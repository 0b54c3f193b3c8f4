"""Defaults and bounds shared by the options of every command and the library functions behind them (no torch)."""

MAX_FRAMES = 512  # frames per video: the largest count any option accepts
MIN_IMAGE_SIZE = 32  # the smallest square input any backbone is asked for (a backbone may need more: 75 for IRv2)
MAX_IMAGE_SIZE = 1024  # the largest square input
MAX_WORKERS = 64  # decoding processes
DEFAULT_BACKBONE = "inception_resnet_v2.tf_in1k"  # the timm model every command builds unless --backbone says
