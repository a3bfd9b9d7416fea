"""Cap2Seg (seed 000): zero-shot segmentation from caption priors.

`entailment`: the caption side (sec. 3.3), the contextual entailment model that reads `caption [SEP]
description(c)` and answers with an occurrence probability (eq. 2-3) and a distribution over 5 horizontal
stripes (eq. 4-6), and the sec. 5.1 baselines it is compared with. `segmentation`: the segmentation model of
sec. 3.6 (eq. 12-18). `method`: the `cap2seg` method. `ovseg train cap2seg` fits both models.
"""

from ovseg.core.methods.cap2seg.method import Cap2Seg  # noqa: F401
