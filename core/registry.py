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


def _split_top_level(spec: str) -> list[str]:
    """Split on the commas that are not inside [...] (a method spec's options)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UnknownMethodError(f"unbalanced ']' in method list {spec!r}")
        elif ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    if depth:
        raise UnknownMethodError(f"unclosed '[' in method list {spec!r}")
    parts.append(spec[start:])
    return parts


def _option_value(text: str):
    """'on'/'off'/'true'/'false'/'yes'/'no' -> bool, integers -> int, numbers -> float, else the string."""
    low = text.strip().lower()
    if low in ("on", "true", "yes"):
        return True
    if low in ("off", "false", "no"):
        return False
    for kind in (int, float):
        try:
            return kind(low)
        except ValueError:
            pass
    return text.strip()


def split_method_spec(spec: str) -> tuple[str, dict]:
    """'cls_saliency[variant=sem1c, grabcut=off]' -> ('cls_saliency', {'variant': 'sem1c', 'grabcut': False}).

    A plain name has no options. Option values: on/off/true/false/yes/no are booleans, numbers are numbers,
    anything else a string. The method name is checked against the registry."""
    spec = spec.strip()
    name, options = spec, {}
    if "[" in spec:
        if not spec.endswith("]") or spec.count("[") != 1 or spec.count("]") != 1:
            raise UnknownMethodError(f"a method with options reads name[key=value, ...], got {spec!r}")
        name, body = spec[:-1].split("[", 1)
        name = name.strip()
        for item in body.split(","):
            if not item.strip():
                continue
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key.isidentifier() or not value.strip():
                raise UnknownMethodError(f"method option {item.strip()!r} in {spec!r} is not key=value")
            if key in options:
                raise UnknownMethodError(f"method option {key!r} is given twice in {spec!r}")
            options[key] = _option_value(value)
    get_method(name)
    return name, options


def format_method_spec(name: str, options: dict) -> str:
    """The canonical spelling of a spec (options in the given order, no spaces)."""
    if not options:
        return name
    def text(v):
        return ("on" if v else "off") if isinstance(v, bool) else str(v)
    return f"{name}[{','.join(f'{k}={text(v)}' for k, v in options.items())}]"


def parse_methods(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'cam, cls_saliency[grabcut=off]' or a list -> validated method specs in canonical spelling (order
    kept, duplicates dropped). A spec is a method name, optionally with constructor options in brackets;
    `split_method_spec` takes one apart."""
    items = _split_top_level(spec) if isinstance(spec, str) else [str(s) for s in spec]
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise UnknownMethodError("no method named; available: " + ", ".join(available_methods()))
    out: list[str] = []
    for item in items:
        canonical = format_method_spec(*split_method_spec(item))
        if canonical not in out:
            out.append(canonical)
    return out
