"""The README's set-up commands (`make demo`, `make test`): an unsupported Python is refused in one line, before a
virtual environment or any download is made."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
@pytest.mark.parametrize("version", ["3.9.18", "3.13.1"])
def test_make_refuses_a_python_outside_3_10_to_3_12(tmp_path, version):
    fake = tmp_path / "python"  # answers -V and -c as that Python would
    major, minor = version.split(".")[:2]
    fake.write_text(f'#!/bin/sh\n[ "$1" = -V ] && {{ echo "Python {version}"; exit 0; }}\n'
                    f'[ "$1" = -c ] && exec python3 -c "import sys; sys.version_info = ({major}, {minor}, 0); $2"\n'
                    "exit 99\n")
    fake.chmod(0o755)
    done = subprocess.run(["make", "-C", str(ROOT), f"VENV={tmp_path / 'venv'}", f"PYTHON={fake}",
                           "venv"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"ctflow needs Python 3.10-3.12, and {fake} is Python {version}" in done.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_lets_a_supported_python_through_to_the_venv_step(tmp_path):
    fake = tmp_path / "python"  # a 3.12 that passes the check, then fails at `-m venv` (so nothing is installed)
    fake.write_text('#!/bin/sh\n[ "$1" = -c ] && exec python3 -c "import sys; sys.version_info = (3, 12, 0); $2"\n'
                    'echo "fake python: $*" >&2; exit 99\n')
    fake.chmod(0o755)
    done = subprocess.run(["make", "-C", str(ROOT), f"VENV={tmp_path / 'venv'}", f"PYTHON={fake}", "venv"],
                          capture_output=True, text=True, timeout=60)
    assert "needs Python" not in done.stderr and "fake python: -m venv" in done.stderr
