"""`make` says what it is doing while it builds the environment (each step announced before
the pip command that can take minutes), checked on its dry run."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_every_install_step_is_announced_first() -> None:
    dry = subprocess.run(["make", "-n", "-B", ".venv/.opsd-installed"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    lines = dry.splitlines()
    steps = [int(m.group(1)) for line in lines if (m := re.search(r'echo "\[(\d)/4\]', line))]
    assert sorted(set(steps)) == [1, 2, 3, 4], dry
    announced = 0
    for line in lines:
        if m := re.search(r'echo "\[(\d)/4\]', line):
            announced = int(m.group(1))
        if "pip install" in line:
            assert announced, f"{line!r} runs before any step is announced"
        if "--no-build-isolation" in line:  # the long one: the native build
            assert announced == 3, line
