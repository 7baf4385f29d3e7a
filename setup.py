"""Build step only (everything else is in pyproject.toml): a wheel carries the checkout's top-level
templates/, bpf/ and config/ as ipfixer/_share/<name>, so an installed ipfixer works from any directory.

The top-level directories stay the one source; ipfixer/resources.py finds the copies with
importlib.resources and falls back to the checkout (editable installs get no copies, they read the tree).
"""

from __future__ import annotations

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

SHARED = ("templates", "bpf", "config")
HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithShare(build_py):  # type: ignore[misc]  # setuptools ships no types
    """build_py that also copies the shared top-level directories into the built package."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable: ipfixer.resources reads the checkout itself
        for name in SHARED:
            src = os.path.join(HERE, name)
            if not os.path.isdir(src):
                raise SystemExit(f"setup.py: {src} is missing; a wheel without it would not run")
            dest = os.path.join(self.build_lib, "ipfixer", "_share", name)
            shutil.rmtree(dest, ignore_errors=True)  # a reused build/ must not keep files deleted here
            self.copy_tree(src, dest)


setup(cmdclass={"build_py": BuildPyWithShare})
