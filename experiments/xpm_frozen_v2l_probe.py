"""Probe for issue 5: how far does a better vision-to-language map take `xpm` on target classes?

XPM's teacher gets its novel-word ability from caption pretraining (OVR-CNN's frozen V2L layer), which this
machine cannot do at the paper's scale. This probe stands a training-free V2L in for it: a region's pooled
1280-d backbone feature -> the frozen ImageNet classifier -> softmax p over the 1000 classes -> the
p-weighted mean of the class names' text embeddings E (the same MiniLM space as the word vectors), minus T
times the mean class-name embedding (so that a word scores above background only where it beats its own
similarity to an average ImageNet class). It replaces the trained embedding head of the shipped networks and
keeps their proposals and mask heads, then runs `ovseg eval` with the given arguments.

    .venv/bin/python experiments/xpm_frozen_v2l_probe.py eval ../shared/data/coco_dev \
        --methods "cam,xpm,xpm[network=teacher]" --base-on-held-out --out runs/v2l_probe

V2L_T (default 1.0) sets T. Nothing here is part of the engine.
"""

import os
import sys

import torch

from ovseg.core import xpm_model
from ovseg.core.boxes import roi_align
from ovseg.core.models import Models

T = float(os.environ.get("V2L_T", "1.0"))
SCALE = 30.0  # a single word's probability against background does not depend on it
_frozen: dict = {}


def _v2l() -> dict:
    if not _frozen:
        m = Models()
        _frozen.update(E=m.class_name_embeddings.float(), W=m.backbone.classifier.weight.float(),
                       b=m.backbone.classifier.bias.float())
    return _frozen


_pyramid = xpm_model.XPMNet.pyramid


def pyramid(self, feats):
    pyr = _pyramid(self, feats)
    pyr["head"] = (feats["head"] if isinstance(feats, dict) else feats.head).float()
    return pyr


def embed(self, pyr, boxes):
    v = _v2l()
    f = roi_align(pyr["head"][0], boxes, 2, 1.0 / 32).mean(dim=(2, 3))
    p = torch.softmax(f @ v["W"].T + v["b"], dim=1)
    return SCALE * (p @ v["E"] - T * v["E"].mean(0))


xpm_model.XPMNet.pyramid = pyramid
xpm_model.XPMNet.embed = embed

if __name__ == "__main__":
    from ovseg.app.cli import main

    sys.exit(main())
