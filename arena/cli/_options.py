"""Options shared by several commands: one name, one meaning, one range everywhere."""

from __future__ import annotations

import click

from arena.limits import DEFAULT_BACKBONE, MAX_FRAMES, MAX_IMAGE_SIZE, MAX_WORKERS, MIN_IMAGE_SIZE


def parse_frame_counts(ctx, param, value: str) -> tuple[int, ...]:
    """Parse ``24,32,48`` into sorted unique positive ints, refusing anything else with the allowed range."""
    try:
        counts = sorted({int(x) for x in str(value).split(",") if x.strip()})
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated frame counts, e.g. 24,32,48") from None
    if not counts or counts[0] < 1 or counts[-1] > MAX_FRAMES:
        raise click.BadParameter(f"{value!r}: each frame count must be in 1..{MAX_FRAMES}")
    return tuple(counts)


def parse_shard(ctx, param, value: str | None) -> tuple[int, int] | None:
    """``--shard i/n`` through the cache's one parser (`arena.cache.parse_shard`)."""
    if value is None:
        return None
    from arena.cache import parse_shard as parse  # h5py: imported when --shard is given, not for --help
    from arena.errors import OptionError

    try:
        return parse(value)
    except OptionError as exc:
        raise click.BadParameter(str(exc)) from None


def backbone_options(f):
    """The options that choose and load the backbone, shared by every command that builds one."""
    f = click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the random backbone (--no-pretrained) and of everything random.")(f)
    f = click.option("--image-size", type=click.IntRange(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), default=None,
                     help="Input size (square); default: the backbone's own (299 for inception_resnet_v2).")(f)
    f = click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Local .pth/.safetensors backbone weights (instead of the timm hub).")(f)
    f = click.option("--pretrained/--no-pretrained", default=True, show_default=True,
                     help="ImageNet weights from the timm hub cache, or a random backbone (tests, demo).")(f)
    f = click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True,
                     help="timm model name.")(f)
    return f


def _check_device(ctx, param, value: str) -> str:
    from arena.runtime import check_device_name  # torch: imported when a command runs, not for --help

    try:
        return check_device_name(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def device_option(f):
    """``--device auto|cpu|cuda|cuda:N``: the same choice on every command."""
    return click.option("--device", default="auto", show_default=True, callback=_check_device,
                        help="auto, cpu, cuda or cuda:N (auto: the first CUDA GPU when there is one).")(f)


def video_batch_option(default: int, *, help: str = "Videos per step.", maximum: int = 4096):
    """``--batch-size``: always counts videos."""
    return click.option("--batch-size", type=click.IntRange(1, maximum), default=default, show_default=True,
                        help=help)


def frame_batch_option(f):
    """``--frame-batch``: frames per backbone forward (features, submit, evaluate)."""
    return click.option("--frame-batch", type=click.IntRange(1, 4096), default=64, show_default=True,
                        help="Frames per backbone forward pass (all views of a video are flattened into these).")(f)


def workers_option(f):
    return click.option("--workers", type=click.IntRange(0, MAX_WORKERS), default=2, show_default=True,
                        help="Decoding processes running ahead of the model (0: decode in the main process).")(f)


def crop_options(f):
    """``--crop none|faces`` and the face stage's settings (`arena.faces.FaceCropConfig`), for the commands that
    decide how frames are cut: ``features`` and ``train-full``. `face_config` turns them into a config."""
    f = click.option("--max-faces", type=click.IntRange(1, 16), default=1, show_default=True,
                     help="Face tracks kept per video (--crop faces); the video's probability is the maximum over "
                          "them at submit time.")(f)
    f = click.option("--detect-frames", type=click.IntRange(1, MAX_FRAMES), default=16, show_default=True,
                     help="Frames per video the face detector runs on (uniformly spaced); boxes of the other "
                          "frames are interpolated along each face track.")(f)
    f = click.option("--detect-size", type=click.IntRange(32, 4096), default=640, show_default=True,
                     help="Long side (px) of the downscaled copy the face detector sees; never upscaled.")(f)
    f = click.option("--face-margin", type=click.FloatRange(1.0, 4.0), default=1.3, show_default=True,
                     help="Side of the square face crop over the face's larger side (1.3: 30 %% around it).")(f)
    f = click.option("--face-detector", default="mtcnn", show_default=True,
                     help="Face detector (--crop faces): mtcnn (facenet-pytorch) or dlib-hog (arena[faces-extra]).")(f)
    f = click.option("--crop", type=click.Choice(["none", "faces"]), default="none", show_default=True,
                     help="Whole frames resized to the input (none), or square crops around the main face track "
                          "(faces: MTCNN on a downscaled copy, tracked, smoothed, cut from the full-resolution "
                          "frame).")(f)
    return f


def face_config(crop: str, face_detector: str, face_margin: float, detect_size: int, detect_frames: int,
                max_faces: int):
    """The `arena.faces.FaceCropConfig` the crop options ask for; None for ``--crop none``."""
    if crop == "none":
        return None
    from arena.faces.stage import FaceCropConfig

    return FaceCropConfig(detector=face_detector, margin=face_margin, detect_size=detect_size,
                          detect_frames=detect_frames, max_faces=max_faces)


def model_crop_options(f):
    """``--crop`` and ``--max-faces`` for commands that run a trained model (``submit``, ``evaluate``): the face
    settings come from the model; a ``--crop`` other than the model's is refused."""
    f = click.option("--max-faces", type=click.IntRange(1, 16), default=None,
                     help="Face tracks scored per video; the video's probability is the maximum over them "
                          "(DFDC's rule for videos where one of two faces is swapped). Default: the model's.")(f)
    f = click.option("--crop", type=click.Choice(["none", "faces"]), default=None,
                     help="Must match the model's crop mode (default: the model's); a mismatch is refused.")(f)
    return f


def _pseudo_spec(kind: str):
    """A ``--pseudo-fakes`` callback: the ``train`` or ``cache`` spec through `arena.pseudo`'s parser (None when
    not given), refused with its message."""

    def callback(ctx, param, value: str | None):
        if value is None:
            return None
        from arena.errors import OptionError
        from arena.pseudo import parse_cache_spec, parse_train_spec  # torch: imported when the option is given

        try:
            return (parse_train_spec if kind == "train" else parse_cache_spec)(value)
        except OptionError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


def train_pseudo_options(f):
    """``--pseudo-fakes sbi[:P]`` and ``--train-on all|real`` (``train-full``)."""
    f = click.option("--train-on", type=click.Choice(["all", "real"]), default="all", show_default=True,
                     help="all: the training part's videos; real: its reals only, the fakes being their "
                          "--pseudo-fakes twins (the SBI protocol). Validation is the same either way.")(f)
    f = click.option("--pseudo-fakes", default=None, metavar="sbi[:P]", callback=_pseudo_spec("train"),
                     help="Give each training real, with probability P per epoch (default 1), a twin in its "
                          "batch: a self-blended copy of itself labelled fake (SBI: a jittered copy pasted under a "
                          "face-shaped mask from the face box, else a random face-sized region). Default: off.")(f)
    return f


def cache_pseudo_option(f):
    """``--pseudo-fakes sbi:K`` (``features``)."""
    return click.option("--pseudo-fakes", default=None, metavar="sbi[:K]", callback=_pseudo_spec("cache"),
                        help="Also cache K self-blended copies (default 1) of every labelled real as extra items "
                             "KEY#sbi0..KEY#sbi<K-1>, labelled fake, for tune-head (the copies of training reals "
                             "only). Default: none.")(f)


# --- GPU pipeline (issue 16): where frames are decoded and where the TTA views are made -----------------------------


def _check_decoder(ctx, param, value: str) -> str:
    from arena.errors import OptionError
    from arena.nvdec import use_nvdec  # torch: imported when a command runs, not for --help

    try:
        use_nvdec(value)  # refuses "nvdec" where CUDA or PyNvVideoCodec is missing, before any work starts
    except OptionError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def decoder_option(default: str = "cpu"):
    """``--decoder auto|cpu|nvdec`` (`arena.nvdec`): NVIDIA's hardware decoder through PyNvVideoCodec, or the CPU."""
    return click.option("--decoder", type=click.Choice(["auto", "cpu", "nvdec"]), default=default,
                        show_default=True, callback=_check_decoder,
                        help="Video decoder: cpu (FFmpeg through torchcodec), nvdec (the GPU's NVDEC through "
                             "PyNvVideoCodec, pip install 'arena[gpu]'; refused without CUDA) or auto (nvdec where it "
                             "loads, else cpu). Files NVDEC cannot decode (rotated, 10-bit, 4:2:2/4:4:4, unsupported "
                             "codec) are decoded on the CPU with a note. NVDEC's pixels may differ slightly from "
                             "FFmpeg's, so cpu is the default: reproducible, the pixels of every cache built so far; "
                             "on a GPU machine opt in with auto.")


def views_on_option(default: str = "cpu"):
    """``--views-on cpu|device`` (`arena.clips.ClipDataset`): where the TTA views are made."""
    return click.option("--views-on", type=click.Choice(["cpu", "device"]), default=default, show_default=True,
                        help="Where the test-time views are made: cpu (albumentations in the decoding workers) or "
                             "device (torch on the model's device, arena.tta_tensor: equal to cpu within 1 level on "
                             "the shift-scale-rotate view, bit for bit on the others; spares the CPU on a GPU "
                             "machine). cpu is the default: byte-identical caches.")
