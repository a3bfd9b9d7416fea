"""What the browser tests share: Chromium's path and flags, the CI rule, a free port, and ovseg-app in a
subprocess."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# The project's root, the shared data beside it (../shared, as CI lays it), and where tests save screenshots.
ROOT = Path(__file__).resolve().parents[1]
COCO_DEV = ROOT.parent / "shared" / "data" / "coco_dev"
ARTIFACTS = ROOT / "tests" / "artifacts"

# The browser the Playwright tests drive: Chromium on the PATH (as .ci/run looks for it), else Debian's.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
START_TIMEOUT_S = 120


def in_ci() -> bool:
    """Whether the tests run in CI: the environment variable CI set to anything truthy (1, true, yes; CI
    services set CI=true, people type CI=1)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def missing(what: str, how: str) -> None:
    """A test cannot run for want of `what` (a browser, Playwright): a failure in CI, a skip elsewhere."""
    if in_ci():
        pytest.fail(f"{what} is missing in CI ({how})", pytrace=False)
    pytest.skip(f"{what} is missing: {how}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until_serving(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        if serving(url):
            return
        time.sleep(0.5)
    pytest.fail(f"the server did not answer on {url} within {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")


def stop(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """Terminate a process a test started, and kill it when it does not stop within `grace_s`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)


@contextlib.contextmanager
def running_webapp(work: Path, env: dict | None = None):
    """ovseg-app (CPU) in a subprocess started in `work`, outside the checkout, with `env` added to the
    environment; yields its URL. On exit it is stopped (killed if need be), and its log must hold no
    traceback."""
    port = free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(work / "gradio"), GRADIO_ANALYTICS_ENABLED="False", **(env or {}))
    log_path = work / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ovseg.app.webapp", "--port", str(port), "--device", "cpu"],
                                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, proc, log_path)
        yield url
    finally:
        stop(proc)
    errors = server_tracebacks(log_path.read_text(errors="replace"))
    assert not errors, errors[-1][-4000:]


def server_tracebacks(log: str) -> list[str]:
    """The tracebacks in a server log, but for a client that went away in the middle of a request (a page
    closed while the browser still sent an upload: starlette's ClientDisconnect), which is no server error."""
    blocks = log.split("Traceback (most recent call last):")[1:]
    return [b for b in blocks if not b.rstrip().endswith("starlette.requests.ClientDisconnect")]


def kill_after_checkpoint(proc: subprocess.Popen, state: Path, min_step: int, timeout_s: float = 300) -> None:
    """SIGKILL a training run once its training-state file (ovseg.train.scale.loop) records at least
    `min_step` steps; fails if the run ends first."""
    import signal

    import torch

    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            try:
                step = torch.load(state, map_location="cpu", weights_only=False)["loop"]["global_step"]
            except Exception:  # noqa: BLE001 - being replaced this instant (atomic rename): try again
                step = 0
            if step >= min_step:
                break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def train_command(trainer: str, args: list[str], env: dict, torchrun: int = 0, wait: bool = True,
                  timeout_s: float = 900):
    """Run `ovseg train <trainer> --coco coco_dev ARGS` in a subprocess (under torchrun with `torchrun`
    processes); returns the finished run (asserting it succeeded), or with wait=False the running Popen."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "ovseg.app.cli", "train", trainer, "--coco", str(COCO_DEV), *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               *cmd[1:]]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def training_env(cache: Path, needs: str = "captions.json") -> dict:
    """The environment the training subprocesses of the *_scale tests run in: a fresh feature cache, one BLAS
    thread per process, not under torchrun. Skips the test when coco_dev (or its `needs` file) is missing."""
    if not (COCO_DEV / needs).is_file():
        pytest.skip(f"coco_dev is missing ({COCO_DEV / needs})")
    e = dict(os.environ, OVSEG_CACHE_DIR=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("WORLD_SIZE", None)
    return e
