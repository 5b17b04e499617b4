"""README's install lines: each starts with check_python.py, which stops a Python older than 3.11 in one line, before
a venv is made or pip runs; the requirements files keep the notebook's torch and numpy out of its own file.

    python -m pytest tests/test_install.py -q
"""
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
INSTALL_LINES = [line for block in re.findall(r"```bash\n(.*?)```", README, re.S) for line in block.splitlines()
                 if "pip install -r requirements.txt" in line]


def python_310():
    """A Python 3.10 interpreter on this machine (pyenv's, where there is one), or None."""
    for path in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10"))):
        return path
    return None


def test_every_fresh_install_line_checks_python_first():
    assert len(INSTALL_LINES) >= 3, INSTALL_LINES  # the two commands and the GPU install for drivers 525-579
    assert all(line.startswith("python3 check_python.py && python3 -m venv .venv && ") for line in INSTALL_LINES), \
        INSTALL_LINES


@pytest.mark.skipif(python_310() is None, reason="no Python 3.10 on this machine")
def test_python_310_stops_in_one_line_before_a_venv_or_pip(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(python_310())
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull)
    env.pop("VIRTUAL_ENV", None)
    test_line = next(line for line in INSTALL_LINES if line.endswith("python -m pytest"))
    shutil.copy(ROOT / "check_python.py", tmp_path)  # a checkout, as the line is run in
    done = subprocess.run(["bash", "-c", test_line], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1
    assert re.fullmatch(r"error: arc-lora needs Python 3\.11 to 3\.13, this is 3\.10\.\d+\n", done.stderr), done.stderr
    assert done.stdout == "" and not (tmp_path / ".venv").exists()


@pytest.mark.parametrize("version", ["3.6", "3.8", "3.9"])
def test_the_check_reads_on_an_old_python_and_stops_it(version):
    """check_python.py is written for any Python 3: an old one gets the line, not a SyntaxError."""
    found = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
    if not found:
        pytest.skip(f"no Python {version} on this machine")
    done = subprocess.run([found[0], "check_python.py"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and re.fullmatch(rf"error: arc-lora needs Python 3\.11 to 3\.13, this is "
                                                 rf"{re.escape(version)}\.\d+\n", done.stderr), done.stderr


def test_the_check_lets_this_python_through(tmp_path):
    check = INSTALL_LINES[0].split(" && ")[0]
    done = subprocess.run(["bash", "-c", check.replace("python3 ", f"{sys.executable} ", 1)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def pins(name):
    lines = (ROOT / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_requirements_are_the_notebook_set_plus_torch_and_numpy():
    notebook = pins("requirements-notebook.txt")
    assert pins("requirements.txt") == ["torch==2.14.1", "numpy==2.4.6", "-r requirements-notebook.txt"]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", pin) for pin in notebook), notebook
    assert not {pin.split("==")[0].lower() for pin in notebook} & {"torch", "numpy", "triton", "torchvision"}
