"""The trainers `ovseg train` offers: each trainer module registers itself with `register_trainer`, the way
methods register with `ovseg.core.registry.register_method`, so adding a trainer edits no CLI code."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Trainer:
    """`ovseg train NAME`: `add_arguments(parser)` declares its flags, `run(args) -> Path` trains and returns
    the checkpoint folder it wrote (None in a torchrun process other than rank 0, which writes nothing).
    `distributed`: it runs on `ovseg.train.scale` and may be started under torchrun with several processes."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Path]
    distributed: bool = False


_TRAINERS: dict[str, Trainer] = {}


def register_trainer(name: str, help: str, add_arguments, run, distributed: bool = False) -> Trainer:
    """Called once by each trainer module: `register_trainer("xpm", "XPM's ...", add_arguments, run)`."""
    if name in _TRAINERS and _TRAINERS[name].run is not run:
        raise ValueError(f"trainer {name!r} is already registered")
    _TRAINERS[name] = Trainer(name, help, add_arguments, run, distributed)
    return _TRAINERS[name]


def trainers() -> dict[str, Trainer]:
    """Every registered trainer by name (importing `ovseg.train.methods` registers the built-in ones)."""
    import ovseg.train.methods  # noqa: F401

    return dict(sorted(_TRAINERS.items()))
