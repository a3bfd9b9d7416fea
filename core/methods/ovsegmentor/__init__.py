"""OVSegmentor (seed 004): image patches bound into learnable groups by slot attention, the groups aligned to
words, learned from image-caption pairs alone.

`model`: the network (visual encoder with the binding module, projections, the entity-completion decoder) and
the losses of sec. 3.2; `text`: the entity set, masked captions and prompts; `method`: the `ovsegmentor`
method. `ovseg train ovsegmentor` trains it.
"""

from ovseg.core.methods.ovsegmentor.method import OVSegmentor  # noqa: F401
