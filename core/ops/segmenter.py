"""Class-agnostic segmenter with attention channels (Golub et al., WACV 2020, sec. 3.2 and 4.1).

F': (B, C, H, W) -> (B, 2, H, W) logits (channel 0 background, channel 1 foreground), where the input is the
RGB image plus C - 3 saliency maps: C = 3 (SEM-0C, no saliency), 4 (SEM-1C, S+), 5 (SEM-2C, S+ and S-).

The paper's DeepLabv3/ResNet-50 is replaced by a DeepLabv3+-style head on EfficientNet-Lite0 (`core/backbone.py`):
- first layer: the stem conv is widened by `widen_stem`, which keeps the pretrained RGB conv untouched and adds a
  small conv over the extra channels (weights ~ N(0, init_std)); both are summed before the stem's BN, so with
  zero extra weights the network is bit-identical to the classifier on the RGB part;
- ASPP on c5 (last block, stride 32, 320 ch). We take c5 rather than the 1280-ch `head`: the head is a 1x1
  conv tuned to the ImageNet classifier and four times wider (slower ASPP); c4 is not used. Default rates
  (2, 4, 6): a ~448 px input gives a 14x14 c5 map, and DeepLabv3's (6, 12, 18) at stride 16 on a 33x33 map
  scale to about (2.5, 5, 7.6) here; rate 6 already spans 13 cells, i.e. almost the whole map;
- low-level skip from c3 (stride 8, 40 ch -> 48 ch), decoder of two 3x3 conv+BN+ReLU at stride 8, 1x1
  classifier to 2 channels, bilinear upsampling to the input size;
- optionally (`priors_to_head`), the saliency maps averaged down to c5's and c3's grids are also concatenated
  to the ASPP's and the low-level branch's inputs, so the trainable head sees them directly.
Inputs must have sides that are multiples of 32 (the package's static "same" padding; see backbone.py).
Drop-connect is off (as in `Backbone`). BatchNorm in the ASPP pooling branch needs batches of >= 2 to train.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from ovseg.core.models.backbone import stage_ends
from ovseg.core.errors import ModelError

IGNORE_INDEX = 255
TRAIN_BACKBONE_CHOICES = ("none", "stem", "all")
HEAD_PREFIXES = ("aspp.", "low_level.", "decoder.", "classifier.")
# Parts of the EfficientNet the segmenter never runs: never trained, never saved.
UNUSED_BACKBONE_PREFIXES = ("backbone._conv_head.", "backbone._bn1.", "backbone._fc.")


@dataclass
class SegmenterConfig:
    """in_channels: 3 (SEM-0C), 4 (SEM-1C, S+), 5 (SEM-2C, S+ and S-). train_backbone: "none" (backbone frozen,
    only the new input channels' stem weights train), "stem" (the whole stem conv + BN train), "all"."""

    in_channels: int = 5
    aspp_channels: int = 128
    aspp_rates: tuple[int, ...] = (2, 4, 6)
    use_low_level: bool = True
    low_level_channels: int = 48
    dropout: float = 0.1
    new_channel_init_std: float = 0.01
    train_backbone: str = "stem"
    # Also give the priors (downsampled by area averaging) to the trainable head: the ASPP and the low-level
    # branch see them beside the backbone features. With a frozen backbone the stem alone carries them too
    # weakly for the head to use (see the README's ablation).
    priors_to_head: bool = False

    def __post_init__(self):
        self.aspp_rates = tuple(int(r) for r in self.aspp_rates)  # JSON gives lists
        if self.in_channels not in (3, 4, 5):
            raise ValueError(f"in_channels must be 3, 4 or 5, not {self.in_channels}")
        if self.train_backbone not in TRAIN_BACKBONE_CHOICES:
            raise ValueError(f"train_backbone must be one of {TRAIN_BACKBONE_CHOICES}, not {self.train_backbone!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aspp_rates"] = list(self.aspp_rates)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SegmenterConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelError(f"unknown segmenter config keys {unknown}; known: {sorted(known)}")
        return cls(**d)


class SplitStemConv(nn.Module):
    """Stem conv on (B, 3 + k, H, W) -> (B, out, H/2, W/2): `rgb` (the original conv, unchanged) on channels
    0-2 plus `extra` (same class, stride and "same" padding; k input channels, no bias) on the rest, summed."""

    def __init__(self, rgb_conv: nn.Conv2d, extra_channels: int, init_std: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        if extra_channels < 1:
            raise ValueError("SplitStemConv needs at least one extra channel")
        w = rgb_conv.weight
        self.rgb = rgb_conv
        self.extra = copy.deepcopy(rgb_conv)  # keeps the padding behaviour (static or dynamic "same")
        new = torch.empty(w.shape[0], extra_channels, *w.shape[2:], dtype=w.dtype, device=w.device)
        new.normal_(0.0, init_std, generator=generator)
        self.extra.weight = nn.Parameter(new)
        self.extra.bias = None
        self.extra.in_channels = extra_channels
        self.in_channels = rgb_conv.in_channels + extra_channels
        self.out_channels = rgb_conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"stem expects {self.in_channels} input channels, got {x.shape[1]}")
        n = self.rgb.in_channels
        return self.rgb(x[:, :n]) + self.extra(x[:, n:])


def widen_stem(net: nn.Module, in_channels: int, init_std: float = 0.01,
               generator: torch.Generator | None = None) -> nn.Module:
    """Make `net._conv_stem` take `in_channels` (>= 3) inputs, in place; returns `net`. The RGB weights are
    kept exactly; the new channels' weights are drawn from N(0, init_std) with `generator` (None: global RNG).
    in_channels == 3 returns `net` unchanged."""
    stem = net._conv_stem
    if isinstance(stem, SplitStemConv):
        raise ValueError("the stem is already widened")
    if in_channels < stem.in_channels:
        raise ValueError(f"in_channels must be >= {stem.in_channels}, not {in_channels}")
    if in_channels > stem.in_channels:
        net._conv_stem = SplitStemConv(stem, in_channels - stem.in_channels, init_std, generator)
    return net


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """DeepLabv3 ASPP: (B, in, h, w) -> (B, out, h, w). Branches: 1x1 conv, one 3x3 atrous conv per rate, and
    image-level pooling (global average, 1x1 conv, broadcast back); each conv+BN+ReLU; concatenated, then
    1x1 projection + BN + ReLU + dropout."""

    def __init__(self, in_channels: int, out_channels: int, rates=(2, 4, 6), dropout: float = 0.1):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(in_channels, out_channels, 1)]
                                      + [_conv_bn_relu(in_channels, out_channels, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(in_channels, out_channels, 1))
        n = len(self.branches) + 1
        self.project = nn.Sequential(*_conv_bn_relu(n * out_channels, out_channels, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, dim=1))


class ClassAgnosticSegmenter(nn.Module):
    """F': (B, in_channels, H, W) -> (B, 2, H, W) logits. See the module docstring for the architecture.

    `backbone` is an EfficientNet-Lite0 (or a `Backbone`, whose `.net` is used). The segmenter takes ownership:
    it widens the stem in place and changes requires_grad / train mode, so do not pass the network the
    classifier uses; pass a fresh `load_efficientnet_lite0()`. `generator` seeds the new stem weights."""

    def __init__(self, backbone: nn.Module, config: SegmenterConfig | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else SegmenterConfig()
        net = getattr(backbone, "net", backbone)
        self.backbone = widen_stem(net, cfg.in_channels, cfg.new_channel_init_std, generator)
        self._stage_ends = stage_ends(self.backbone)
        c3_ch = net._blocks[self._stage_ends[8]]._block_args.output_filters
        c5_ch = net._blocks[-1]._block_args.output_filters
        extra = cfg.in_channels - 3 if cfg.priors_to_head else 0
        self.aspp = ASPP(c5_ch + extra, cfg.aspp_channels, cfg.aspp_rates, cfg.dropout)
        dec_in = cfg.aspp_channels
        if cfg.use_low_level:
            self.low_level = _conv_bn_relu(c3_ch + extra, cfg.low_level_channels, 1)
            dec_in += cfg.low_level_channels
        self.decoder = nn.Sequential(_conv_bn_relu(dec_in, cfg.aspp_channels, 3),
                                     _conv_bn_relu(cfg.aspp_channels, cfg.aspp_channels, 3))
        self.classifier = nn.Conv2d(cfg.aspp_channels, 2, 1)
        for name, p in self.named_parameters():
            p.requires_grad_(self._is_trainable_key(name))
        self.train(self.training)

    @classmethod
    def from_package(cls, config: SegmenterConfig | None = None,
                     generator: torch.Generator | None = None) -> ClassAgnosticSegmenter:
        """Built on a fresh copy of the packaged, ImageNet-pretrained EfficientNet-Lite0."""
        from ovseg.core.models.backbone import load_efficientnet_lite0

        return cls(load_efficientnet_lite0(), config, generator)

    def _is_trainable_key(self, key: str) -> bool:
        """Whether a parameter/buffer name belongs to a trained part (heads, plus the backbone part that
        `train_backbone` unfreezes). The same rule selects `trainable_parameters` and `state_dict_small`."""
        if key.startswith(HEAD_PREFIXES):
            return True
        mode = self.config.train_backbone
        if mode == "none":
            return key.startswith("backbone._conv_stem.extra.")
        if mode == "stem":
            return key.startswith(("backbone._conv_stem.", "backbone._bn0."))
        return key.startswith("backbone.") and not key.startswith(UNUSED_BACKBONE_PREFIXES)

    def train(self, mode: bool = True) -> ClassAgnosticSegmenter:
        """As nn.Module.train, but the frozen backbone parts (their BN statistics) always stay in eval mode."""
        super().train(mode)
        tb = self.config.train_backbone
        if tb != "all":
            self.backbone.eval()
            if tb == "stem" and mode:
                self.backbone._conv_stem.train()
                self.backbone._bn0.train()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should get (heads + the part of the backbone `train_backbone` names)."""
        return [p for n, p in self.named_parameters() if self._is_trainable_key(n)]

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, in_channels, H, W) -> c3 (B, 40, H/8, W/8), c5 (B, 320, H/32, W/32)."""
        net = self.backbone
        y = net._swish(net._bn0(net._conv_stem(x)))
        c3 = None
        for i, block in enumerate(net._blocks):
            y = block(y)
            if i == self._stage_ends[8]:
                c3 = y
        return c3, y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W), H and W multiples of 32; channels 0-2 the RGB image normalised as the
        classifier expects, (x - 127) / 128; channels 3.. the saliency maps S+ (then S-) in [0, 1], mapped
        here to [-1, 1] (2 s - 1) so they share the RGB channels' range. Returns logits (B, 2, H, W)."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected input (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if cfg.in_channels > 3:
            x = torch.cat([x[:, :3], x[:, 3:] * 2.0 - 1.0], dim=1)
        c3, c5 = self._features(x)
        if cfg.priors_to_head and cfg.in_channels > 3:
            priors = x[:, 3:]
            c5 = torch.cat([c5, F.adaptive_avg_pool2d(priors, c5.shape[-2:])], dim=1)
            c3 = torch.cat([c3, F.adaptive_avg_pool2d(priors, c3.shape[-2:])], dim=1)
        y = F.interpolate(self.aspp(c5), size=c3.shape[-2:], mode="bilinear", align_corners=False)
        if cfg.use_low_level:
            y = torch.cat([y, self.low_level(c3)], dim=1)
        y = self.classifier(self.decoder(y))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def state_dict_small(self) -> dict[str, torch.Tensor]:
        """The trained part only: head parameters and BN buffers, plus the backbone entries `train_backbone`
        unfreezes ("none": the extra stem weights; "stem": stem conv + BN; "all": every backbone block). The
        frozen rest comes from the pip package at load time."""
        return {k: v for k, v in self.state_dict().items() if self._is_trainable_key(k)}

    def load_state_dict_small(self, sd: dict[str, torch.Tensor]) -> None:
        """Load what `state_dict_small` saved; ModelError naming the missing/unexpected/mis-shaped keys."""
        expected = self.state_dict_small()
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        shapes = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
        if missing or unexpected or shapes:
            cfg = self.config
            parts = [f"{name} keys ({len(ks)}): {ks[:5]}{' ...' if len(ks) > 5 else ''}"
                     for name, ks in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
                     if ks]
            raise ModelError(f"segmenter checkpoint does not match the model (in_channels={cfg.in_channels}, "
                             f"train_backbone={cfg.train_backbone!r}, use_low_level={cfg.use_low_level}): "
                             + "; ".join(parts))
        self.load_state_dict(sd, strict=False)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits (B, 2, H, W), target (B, H, W) long with 0/1 and 255 = ignore -> mean cross-entropy over the
    non-ignored pixels (a zero that keeps the graph when every pixel is ignored, instead of NaN)."""
    if not (target != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target.long(), ignore_index=IGNORE_INDEX)


def foreground_probability(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, 2, H, W) -> foreground probability (B, H, W) in [0, 1] (softmax channel 1)."""
    return torch.softmax(logits, dim=1)[:, 1]


def save_segmenter(folder: str | Path, model: ClassAgnosticSegmenter, config: SegmenterConfig, train: dict) -> Path:
    """Write what `load_segmenter` reads: weights.pt (the trained parts) and config.json (the segmenter's
    config and `train`, the training settings), each atomically."""
    import io

    from ovseg.core.cache import atomic_write_bytes, atomic_write_json

    folder = Path(folder)
    buf = io.BytesIO()
    torch.save(model.state_dict_small(), buf)
    atomic_write_bytes(folder / "weights.pt", buf.getvalue())
    atomic_write_json(folder / "config.json", {"segmenter": config.to_dict(), "train": train})
    return folder


def load_segmenter(folder: str | Path, device: torch.device) -> ClassAgnosticSegmenter:
    """A segmenter from `folder` (config.json + weights.pt, as `ovseg train cls_saliency` writes them)."""
    folder = Path(folder)
    if not (folder / "weights.pt").is_file() or not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: no trained segmenter (weights.pt + config.json); "
                         "run `ovseg train cls_saliency` to make one")
    config = SegmenterConfig.from_dict(json.loads((folder / "config.json").read_text())["segmenter"])
    model = ClassAgnosticSegmenter.from_package(config)
    model.load_state_dict_small(torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    return model.eval().to(device)
