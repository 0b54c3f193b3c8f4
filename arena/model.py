"""Backbone factory (timm), attention pooling, the detector head and the full detector.

The encoder takes uint8 frames and normalises them itself with the mean/std of timm's data config, so the
cache, training and submission share one preprocessing path. The head works on per-frame features
``[B, T, d]`` whether they come from the cache or from the encoder.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from torch import nn
from torch.utils.checkpoint import checkpoint

from arena.errors import OptionError, WeightsUnavailable
from arena.limits import DEFAULT_BACKBONE, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

# Smallest input the architecture accepts (its stem and reduction blocks run out of pixels below this).
# timm's pretrained configs rarely carry ``min_input_size``, so known architectures are listed here.
_KNOWN_MIN_INPUT = {"inception_resnet_v2": 75, "inception_v3": 75, "inception_v4": 75}
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def _weights_help(name: str, hub_id: str | None = None) -> str:
    fetch = f"`hf download {hub_id}` on a machine with network, then copy the cache" if hub_id else \
        "download them on a machine with network"
    return (
        f"Options: --pretrained (the local Hugging Face cache, or a download when the hub is reachable; offline: "
        f"{fetch}), --weights PATH (a local .pth/.safetensors state_dict of this architecture), "
        "--no-pretrained (random weights, reproducible from the seed)."
    )


def _architecture(name: str) -> str:
    return name.split(".", 1)[0]


def _min_input_size(name: str, pretrained_cfg: Any) -> int:
    arch = _architecture(name)
    if arch in _KNOWN_MIN_INPUT:
        return _KNOWN_MIN_INPUT[arch]
    cfg_min = getattr(pretrained_cfg, "min_input_size", None) if pretrained_cfg is not None else None
    return int(cfg_min[-1]) if cfg_min else MIN_IMAGE_SIZE


def _hub_reachable(timeout_s: float = 2.0) -> bool:
    """True when the Hugging Face hub answers a TCP connect within ``timeout_s`` (and offline mode is off).

    Without this probe an offline machine waits ~46 s in the hub client's retries before failing.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _cached_hub_file(name: str, pretrained_cfg: Any) -> str | None:
    """Return a local path of the hub weights if they are already cached, without touching the network."""
    if pretrained_cfg is None:
        return None
    hub_id = getattr(pretrained_cfg, "hf_hub_id", None)
    if hub_id:
        repo_id, _, revision = hub_id.partition("@")
        filenames = [pretrained_cfg.hf_hub_filename] if pretrained_cfg.hf_hub_filename else []
        filenames += ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = getattr(pretrained_cfg, "url", None)
    if url:
        local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
        if local.is_file():
            return str(local)
    return None


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


class FrameEncoder(nn.Module):
    """A timm backbone without classifier that maps uint8 frames to one feature vector per frame.

    Attributes:
        name: timm model name.
        feature_dim: size of the pooled feature (``model.num_features``).
        input_size: (H, W) the frames should have (decode resizes to this).
        interpolation: resize interpolation named by timm's data config (informational; decode owns resizing).
        weights_source: ``hub:<name>``, ``file:<path>`` or ``random:<name>:seed=<s>``.
    """

    def __init__(self, model: nn.Module, *, name: str, input_size: tuple[int, int], mean: tuple[float, ...],
                 std: tuple[float, ...], interpolation: str, weights_source: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.feature_dim = int(model.num_features)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.interpolation = interpolation
        self.weights_source = weights_source
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.channels_last = False

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Encode frames.

        Args:
            frames: uint8 (or float in 0..255) ``[N, 3, H, W]``.

        Returns:
            float features ``[N, feature_dim]``.
        """
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"FrameEncoder expects frames [N, 3, H, W]; got shape {tuple(frames.shape)}.")
        if self.channels_last:
            frames = frames.contiguous(memory_format=torch.channels_last)
        x = frames.to(self.mean.dtype) / 255.0
        x = (x - self.mean) / self.std
        return self.model(x)

    def to_channels_last(self) -> FrameEncoder:
        """Put the backbone (and every input from now on) in channels_last memory format; faster on CPU and GPU."""
        self.model.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone activations in backward to save memory.

        Uses timm's own support where the model has it; otherwise (e.g. inception_resnet_v2) checkpoints each
        block of the model's ``nn.Sequential`` stages. Outputs and gradients are unchanged; BatchNorm running
        statistics in train mode see the recomputed forward too (as with timm's own checkpointing).
        """
        use_own = False
        try:
            self.model.set_grad_checkpointing(enable)
        except (AssertionError, AttributeError, NotImplementedError, RuntimeError):
            use_own = enable
        # Top-level stages only (inception_resnet_v2: repeat, repeat_1, repeat_2 hold nearly all activations);
        # nested Sequentials inside blocks are recomputed as part of their block anyway.
        for module in self.model.children():
            if isinstance(module, nn.Sequential) and len(module) > 1:
                if use_own:
                    module.forward = functools.partial(_checkpointed_sequential, module)
                elif "forward" in module.__dict__:
                    del module.forward

    def weights_hash(self) -> str:
        """sha256 over every state_dict entry (sorted names, dtype, shape, bytes); stable across processes."""
        h = hashlib.sha256()
        for key, value in sorted(self.state_dict().items()):
            h.update(key.encode())
            h.update(str(value.dtype).encode())
            h.update(str(tuple(value.shape)).encode())
            h.update(_tensor_bytes(value))
        return h.hexdigest()

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, feature_dim={self.feature_dim}, input_size={self.input_size}, "
                f"weights_source={self.weights_source!r}")


def _checkpointed_sequential(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():  # inference: nothing to save, run the plain blocks
        return nn.Sequential.forward(seq, x)
    for block in seq:
        x = checkpoint(block, x, use_reentrant=False)
    return x


def _create_from_file(timm: Any, name: str, path: Path, pretrained_cfg: Any, kwargs: dict[str, Any]) -> nn.Module:
    model = timm.create_model(name, pretrained=False, **kwargs)
    state = timm.models.load_state_dict(str(path), weights_only=True)  # unwraps "state_dict"/"model", "module."
    classifier = getattr(pretrained_cfg, "classifier", None) if pretrained_cfg is not None else None
    prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    state = {k: v for k, v in state.items() if not any(k.startswith(p + ".") for p in prefixes)}
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise WeightsUnavailable(
            f"Weights file {str(path)!r} does not match {name!r}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). "
            "Pass the timm model name the file was saved from with --backbone.")
    model.load_state_dict(state, strict=True)
    return model


def create_encoder(name: str = DEFAULT_BACKBONE, *, pretrained: bool = True, weights: str | os.PathLike | None = None,
                   image_size: int | None = None, seed: int = 0) -> FrameEncoder:
    """Build a frame encoder from a timm model name.

    Args:
        name: timm model name, e.g. ``inception_resnet_v2.tf_in1k`` or ``test_resnet``.
        pretrained: load the hub weights: from the local Hugging Face cache when there, else downloaded when the hub
            answers a 2-second connect probe; an offline machine fails at once instead of retrying for a minute.
        weights: a local ``.pth``/``.safetensors`` state_dict; takes precedence over ``pretrained``.
        image_size: square input size overriding the model's default (e.g. 96 for fast tests).
        seed: seeds the random initialisation when no weights are loaded (reproducible backbone).

    Raises:
        WeightsUnavailable: pretrained weights are not cached locally, or the weights file cannot be loaded.
        OptionError: unknown model name or an image size outside the allowed range.
    """
    if not timm.is_model(name):
        raise OptionError(f"Unknown timm model {name!r}. Try e.g. {DEFAULT_BACKBONE!r}, 'resnet18' or 'test_resnet' "
                         "(see timm.list_models()).")
    pretrained_cfg = timm.models.get_pretrained_cfg(name) if "." in name else None
    if pretrained_cfg is None:
        try:
            pretrained_cfg = timm.models.get_pretrained_cfg(timm.models.get_arch_name(name))
        except Exception:  # noqa: BLE001 - any lookup failure just means "no pretrained config known"
            pretrained_cfg = None

    min_size = _min_input_size(name, pretrained_cfg)
    if image_size is not None and not (min_size <= int(image_size) <= MAX_IMAGE_SIZE):
        raise OptionError(f"image_size={image_size} is not allowed for {name}: use {min_size}..{MAX_IMAGE_SIZE} px "
                         f"(the model's default is {pretrained_cfg.input_size[-1] if pretrained_cfg else 'unknown'}).")

    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size is not None and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        kwargs["img_size"] = int(image_size)  # e.g. ViTs size their position embedding at build time

    if weights is not None:
        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            raise WeightsUnavailable(f"Weights file {str(path)!r} does not exist. {_weights_help(name)}")
        if path.suffix.lower() not in _WEIGHT_SUFFIXES:
            raise WeightsUnavailable(f"Weights file {str(path)!r} has suffix {path.suffix!r}; expected one of "
                                     f"{', '.join(_WEIGHT_SUFFIXES)}.")
        source = f"file:{path}"
        # Not timm's pretrained path: with num_classes=0 it loads non-strictly and would silently keep random
        # weights for a file of another architecture. Build, then load strictly (classifier keys dropped).
        create = functools.partial(_create_from_file, timm, name, path, pretrained_cfg, kwargs)
    elif pretrained:
        cached = _cached_hub_file(name, pretrained_cfg)
        source = f"hub:{name}"
        if cached is not None:
            # Load the cached file directly: timm never contacts the hub, so no retries on an offline machine.
            create = functools.partial(timm.create_model, name, pretrained=True,
                                       pretrained_cfg_overlay={"file": cached}, **kwargs)
        elif os.environ.get("ARENA_ALLOW_DOWNLOAD") == "1" or _hub_reachable():
            create = functools.partial(timm.create_model, name, pretrained=True, **kwargs)
        else:
            hub_id = getattr(pretrained_cfg, "hf_hub_id", None) if pretrained_cfg is not None else None
            raise WeightsUnavailable(f"Pretrained weights for {name!r} are not in the local cache and the hub cannot "
                                     f"be reached. {_weights_help(name, hub_id)}")
    else:
        source = f"random:{name}:seed={int(seed)}"
        create = functools.partial(timm.create_model, name, pretrained=False, **kwargs)

    if weights is not None or not pretrained:
        # create_model draws the random init: seed right before it so the same seed gives the same backbone.
        torch.manual_seed(int(seed))
    try:
        model = create()
    except WeightsUnavailable:
        raise
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        if weights is None and not pretrained:
            raise
        where = f"weights file {str(weights)!r}" if weights is not None else "the cached hub weights"
        raise WeightsUnavailable(f"Could not load {where} into {name!r}: {str(exc).splitlines()[0][:300]}. "
                                 "The file must be a state_dict for this very architecture.") from exc

    cfg = timm.data.resolve_model_data_config(model)
    size = (int(image_size), int(image_size)) if image_size is not None else tuple(cfg["input_size"][-2:])
    encoder = FrameEncoder(model, name=name, input_size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                           interpolation=str(cfg.get("interpolation", "bilinear")), weights_source=source)
    return encoder.eval()


class AttentionPool(nn.Module):
    """Attention over frames: Linear(d→a) → tanh → Linear(a→1) → masked softmax over T.

    Masked frames get weight exactly 0. A row with every frame masked falls back to uniform weights over all
    frames (instead of NaN), so a degenerate video still yields a finite prediction.
    """

    def __init__(self, dim: int, attn_dim: int) -> None:
        super().__init__()
        if dim < 1 or attn_dim < 1:
            raise ValueError(f"AttentionPool needs dim >= 1 and attn_dim >= 1; got dim={dim}, attn_dim={attn_dim}.")
        self.score = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Linear(attn_dim, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool ``x [B, T, d]`` with ``mask [B, T]`` (True = real frame) into ``([B, d], weights [B, T])``."""
        if x.ndim != 3:
            raise ValueError(f"AttentionPool expects x [B, T, d]; got shape {tuple(x.shape)}.")
        scores = self.score(x).squeeze(-1).float()  # softmax in fp32 even under autocast
        if mask is not None:
            if mask.shape != scores.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match frames {tuple(scores.shape)}.")
            mask = mask.to(device=scores.device, dtype=torch.bool)
            mask = torch.where(mask.any(dim=1, keepdim=True), mask, torch.ones_like(mask))
            scores = scores.masked_fill(~mask, -math.inf)
        weights = torch.softmax(scores, dim=1)
        pooled = torch.einsum("bt,btd->bd", weights.to(x.dtype), x)
        return pooled, weights


class DetectorHead(nn.Module):
    """Standardise features → [input dropout] → attention pool → Linear(d→hidden) → ReLU → Dropout → Linear(hidden→2).

    ``feat_mean``/``feat_std`` standardise the input; random-init backbones give tiny features (std ≈ 0.01,
    many exact zeros), so set them from training features with :meth:`set_feature_stats`. They are buffers,
    so they travel with the head's state_dict.

    ``input_dropout`` (default 0: the seed's head) drops standardised features in training only, one mask per
    video shared by its frames. It has no weights, so checkpoints without it load unchanged; on a few hundred
    videos it is the regulariser that lets the 1536→256 head train for more than a few epochs before it overfits.
    """

    def __init__(self, dim: int, *, attn_dim: int = 256, hidden: int = 256, dropout: float = 0.5,
                 input_dropout: float = 0.0) -> None:
        super().__init__()
        for name, p in (("dropout", dropout), ("input_dropout", input_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {p}.")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1; got {hidden}.")
        self.dim, self.attn_dim, self.hidden, self.dropout = int(dim), int(attn_dim), int(hidden), float(dropout)
        self.input_dropout = float(input_dropout)
        self.register_buffer("feat_mean", torch.zeros(dim))
        self.register_buffer("feat_std", torch.ones(dim))
        self.pool = AttentionPool(dim, attn_dim)
        self.classifier = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 2))

    @torch.no_grad()
    def set_feature_stats(self, mean: Any, std: Any, *, eps: float = 1e-4) -> None:
        """Set the standardisation; std is floored at max(eps, 1% of the median std) so dead dims stay finite."""
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean_t.numel() != self.dim or std_t.numel() != self.dim:
            raise ValueError(f"feature stats must have {self.dim} entries; got mean {mean_t.numel()}, "
                             f"std {std_t.numel()}.")
        if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all()):
            raise ValueError("feature stats contain NaN or inf.")
        positive = std_t[std_t > 0]
        floor = max(eps, 0.01 * float(positive.median())) if positive.numel() else eps
        self.feat_mean.copy_(mean_t)
        self.feat_std.copy_(std_t.clamp_min(floor))

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``feats [B, T, d]`` (any float dtype), ``mask [B, T]`` bool → ``(logits [B, 2], attention [B, T])``."""
        if feats.ndim != 3 or feats.shape[-1] != self.dim:
            raise ValueError(f"DetectorHead expects features [B, T, {self.dim}]; got shape {tuple(feats.shape)}.")
        x = (feats.to(self.feat_mean.dtype) - self.feat_mean) / self.feat_std
        return self.forward_standardized(x, mask)

    def forward_standardized(self, z: torch.Tensor,
                             mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` on features already standardised with ``feat_mean``/``feat_std`` (tune-head's loop)."""
        if self.training and self.input_dropout > 0:
            # One mask per video and feature, shared by its frames: a dropped feature is gone from the whole clip
            # (attention and classifier alike), and it draws T times fewer random numbers than elementwise dropout
            # (which took 60 % of a tune-head trial on 48-frame clips).
            keep = torch.empty(z.shape[0], 1, z.shape[-1], device=z.device).bernoulli_(1.0 - self.input_dropout)
            z = z * (keep / (1.0 - self.input_dropout)).to(z.dtype)
        pooled, weights = self.pool(z, mask)
        return self.classifier(pooled), weights

    def config(self) -> dict[str, Any]:
        """Constructor arguments, to rebuild the head from a checkpoint: ``DetectorHead(**cfg)``."""
        return {"dim": self.dim, "attn_dim": self.attn_dim, "hidden": self.hidden, "dropout": self.dropout,
                "input_dropout": self.input_dropout}


class Detector(nn.Module):
    """Encoder + head over clips ``[B, T, 3, H, W]`` (fine-tuning; with gradients, bound memory with
    ``encoder.set_grad_checkpointing(True)``; inference encodes in frame batches with `arena.clips.encode_views`).
    """

    def __init__(self, encoder: FrameEncoder, head: DetectorHead) -> None:
        super().__init__()
        if encoder.feature_dim != head.dim:
            raise ValueError(f"encoder gives {encoder.feature_dim}-d features but the head expects {head.dim}.")
        self.encoder = encoder
        self.head = head

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, T, 3, H, W]`` → features ``[B, T, d]``."""
        if frames.ndim != 5:
            raise ValueError(f"Detector expects frames [B, T, 3, H, W]; got shape {tuple(frames.shape)}.")
        b, t = frames.shape[:2]
        return self.encoder(frames.flatten(0, 1)).reshape(b, t, -1)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``frames`` uint8 ``[B, T, 3, H, W]``, ``mask [B, T]`` → ``(logits [B, 2], attention [B, T])``."""
        return self.head(self.encode(frames), mask)
