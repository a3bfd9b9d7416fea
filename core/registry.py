"""One registry of segmentation methods: the CLI choices, the app's menus and parametrized tests read it.

A method is a class with a `name`, a one-line `summary`, `trained` (whether it needs a checkpoint) and
`predict(state, concept, negatives, caption) -> ConceptResult`; see `ovseg.core.methods.base.Method`.
"""

from __future__ import annotations

from typing import Callable

from ovseg.core.errors import UnknownMethodError

_METHODS: dict[str, type] = {}


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: `@register_method("cam")`. Names are unique lower-case identifiers."""
    if not (name.isascii() and name.isidentifier() and any(c.isalpha() for c in name)) or name != name.lower():
        raise ValueError(f"method names are lower-case identifiers, got {name!r}")

    def decorate(cls: type) -> type:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__qualname__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorate


def _load_builtin() -> None:
    # Importing the package registers the built-in methods (each module applies the decorator).
    import ovseg.core.methods  # noqa: F401


def available_methods() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def get_method(name: str) -> type:
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}") from None


def parse_methods(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'cam, cls_saliency' or a list -> validated list of method names (order kept, duplicates dropped)."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        raise UnknownMethodError("no method named; available: " + ", ".join(available_methods()))
    out: list[str] = []
    for n in names:
        get_method(n)
        if n not in out:
            out.append(n)
    return out
