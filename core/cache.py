"""The user's cache folder and atomic file writes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """OVSEG_CACHE_DIR if set, else $XDG_CACHE_HOME/ovseg, else ~/.cache/ovseg (created on demand)."""
    env = os.environ.get("OVSEG_CACHE_DIR")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "ovseg"
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """OVSEG_DATA_DIR if set, else $XDG_DATA_HOME/ovseg, else ~/.local/share/ovseg (created on demand): what
    the user makes and keeps (FiftyOne datasets, retrained checkpoints), unlike the cache."""
    env = os.environ.get("OVSEG_DATA_DIR")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        path = Path(base) / "ovseg"
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see either the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; what we write is meant to be read
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj, **dumps_options) -> Path:
    """`obj` as indented JSON with a final newline (json.dumps options pass through), written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, **dumps_options) + "\n")


@contextlib.contextmanager
def replaced_folder(out: str | Path):
    """Stage a folder's new contents in `<out>.partial` (yielded), then swap it in whole: an interrupted
    write leaves the previous folder untouched (and a `.partial` the next run clears)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    old = out.with_name(out.name + ".previous")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
