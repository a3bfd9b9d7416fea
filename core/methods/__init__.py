"""The engine's methods. Importing this package registers each one (see `ovseg.core.registry`)."""

from ovseg.core.methods import cam, cls_saliency, concept_mask, xpm  # noqa: F401
from ovseg.core.methods.base import ImageState, Method  # noqa: F401
