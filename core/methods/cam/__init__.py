"""`cam`: the training-free reference (class activation maps of the word's nearest ImageNet classes)."""

from ovseg.core.methods.cam.method import CAM  # noqa: F401
