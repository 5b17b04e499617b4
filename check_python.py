"""Stops a Python older than 3.11 in one line, before a venv is made or anything is installed: README's install
lines start with `python3 check_python.py &&`. Written for any Python 3, so that an old one reads it."""
import platform
import sys

if sys.version_info < (3, 11):
    sys.exit("error: arc-lora needs Python 3.11 to 3.13, this is " + platform.python_version())
