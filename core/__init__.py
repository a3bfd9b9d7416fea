"""ovseg.core: the engine (packaged models, lexicon, methods, result types, metrics).

Importing this package has no side effects: no model is loaded and no device is chosen until asked.
"""

__version__ = "0.1.0"

from ovseg.core.errors import OvsegError, ImageError, ConceptError  # noqa: F401
from ovseg.core.types import Prior, PseudoLabel, ConceptResult, Prediction  # noqa: F401
