"""`fused`: the default method. CAM, XPM proposals and heads, and Concept Mask attention (`evidence`) -> a
learned, cross-fitted combiner (`combiner`) -> one mask and a calibrated presence per word (`method`)."""

from ovseg.core.methods.fused.method import Fused  # noqa: F401
