"""`make install`'s torch step, read with `make -n` (nothing runs): the default installs torch==2.13.0 as pip is
configured (this workplace's local CPU wheel); CPU=1 takes the CPU build from PyTorch's CPU index, where a
plain install would resolve to the CUDA build."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from helpers import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _torch_step(*variables: str) -> str:
    proc = subprocess.run(["make", "-n", "-B", "install", *variables], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    [line] = [line for line in proc.stdout.splitlines() if "pip install" in line and "torch==" in line]
    return line


def test_default_install_keeps_pip_s_own_index():
    line = _torch_step()
    assert "torch==2.13.0" in line and "--index-url" not in line and "--extra-index-url" not in line
    assert _torch_step("CPU=0") == line  # only a yes turns the switch on


@pytest.mark.parametrize("switch", ["CPU=1", "CPU=yes", "CPU=true"])
def test_cpu_switch_installs_torch_from_the_cpu_index(switch):
    line = _torch_step(switch)
    assert "--index-url https://download.pytorch.org/whl/cpu" in line and "torch==2.13.0" in line


def test_torch_index_names_any_index():
    line = _torch_step("TORCH_INDEX=https://mirror.example/whl/cpu")
    assert "--index-url https://mirror.example/whl/cpu" in line and "torch==2.13.0" in line
