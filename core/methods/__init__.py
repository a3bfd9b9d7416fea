"""The engine's methods, one folder per paper (`cam/`, `cls_saliency/`, ...). Each folder's `__init__` imports
its `method.py`, whose class registers itself with `@register_method`; importing this package imports every
folder, so a new method is a new folder and nothing else is edited."""

import importlib
import pkgutil

from ovseg.core.methods.base import ImageState, Method  # noqa: F401


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
