"""Versioned checkpoints made by `ovseg retrain`, and which one the engine uses.

`<data dir>/checkpoints/<method>/v1, v2, ...` each hold a whole model folder (as `ovseg train` writes it)
plus `retrain.json` (what it was trained from, its figures). `current.json` names the version in use;
without it, or with "packaged", the checkpoint shipped in the package is used. Old versions are never
deleted: `ovseg checkpoints xpm --use v1` (or `packaged`) goes back to one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ovseg.core.errors import OvsegError

PACKAGED = "packaged"


def packaged(method: str, *parts: str) -> Path:
    """The checkpoint folder shipped in the package: assets/checkpoints/<method>/<parts...>."""
    from importlib import resources

    return Path(str(resources.files("ovseg.assets").joinpath("checkpoints", method, *parts)))


def in_use(method: str, *parts: str) -> Path:
    """The checkpoint folder the engine loads for a method: the version `ovseg retrain` made current, else
    the packaged one (`parts` select within the packaged folder, e.g. a cls_saliency variant)."""
    return current_folder(method) or packaged(method, *parts)


def method_dir(method: str) -> Path:
    from ovseg.core.cache import data_dir

    return data_dir() / "checkpoints" / method


def versions(method: str) -> list[str]:
    folder = method_dir(method)
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"v\d+", p.name)]
    return sorted(found, key=lambda v: int(v[1:]))


def next_version(method: str) -> str:
    existing = versions(method)
    return f"v{int(existing[-1][1:]) + 1 if existing else 1}"


def current_version(method: str) -> str:
    """The version in use: "v3", or "packaged"."""
    path = method_dir(method) / "current.json"
    if not path.is_file():
        return PACKAGED
    try:
        version = json.loads(path.read_text()).get("version", PACKAGED)
    except (OSError, json.JSONDecodeError):
        return PACKAGED
    return version if version == PACKAGED or (method_dir(method) / version).is_dir() else PACKAGED


def current_folder(method: str) -> Path | None:
    """The folder of the version in use, None for the packaged checkpoint."""
    v = current_version(method)
    return None if v == PACKAGED else method_dir(method) / v


def use(method: str, version: str) -> str:
    """Make `version` ("v2", "2" or "packaged") the one in use; returns its name."""
    from ovseg.core.cache import atomic_write_json

    version = version.strip().lower()
    if re.fullmatch(r"\d+", version):
        version = f"v{version}"
    if version != PACKAGED and version not in versions(method):
        have = ", ".join([PACKAGED, *versions(method)])
        raise OvsegError(f"no {method} checkpoint {version!r}; there are: {have}")
    atomic_write_json(method_dir(method) / "current.json", {"version": version})
    return version


def describe(method: str) -> list[dict]:
    """[{version, current, folder, summary}] of the packaged checkpoint and every retrained one."""
    cur = current_version(method)
    out = [{"version": PACKAGED, "current": cur == PACKAGED, "folder": None, "summary": {}}]
    for v in versions(method):
        meta = method_dir(method) / v / "retrain.json"
        try:
            summary = json.loads(meta.read_text()) if meta.is_file() else {}
        except (OSError, json.JSONDecodeError):
            summary = {}
        out.append({"version": v, "current": cur == v, "folder": str(method_dir(method) / v), "summary": summary})
    return out
