"""Where ipfixer's shipped data lives: the default templates, the classifier's C sources, the default config.

The top-level `templates/`, `bpf/` and `config/` of the checkout are the only source. A built wheel carries
copies under `ipfixer/_share/` (the build step in setup.py), found here through importlib.resources; an
editable install or a plain checkout has no `_share/` and reads the checkout's directories instead.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

ShareName = Literal["templates", "bpf", "config"]
SHARE_NAMES: tuple[ShareName, ...] = ("templates", "bpf", "config")
SHARE_PACKAGE_DIR = "_share"  # setup.py copies the directories to ipfixer/_share/<name> in the wheel
CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


def packaged_dir(name: ShareName) -> Path | None:
    """The copy inside the installed package, if this is an installed wheel (a real directory: bcc needs one)."""
    traversable = resources.files("ipfixer") / SHARE_PACKAGE_DIR / name
    if isinstance(traversable, Path) and traversable.is_dir():
        return traversable.resolve()
    return None


def share_dir(name: ShareName) -> Path:
    """The directory `name`: the wheel's copy, else the checkout's; never raises, so a missing one is
    reported by whoever reads it, with this path in the message."""
    packaged = packaged_dir(name)
    if packaged is not None:
        return packaged
    return CHECKOUT_ROOT / name


def share_file(name: ShareName, *parts: str) -> Path:
    """A file inside one of the shipped directories, e.g. share_file("config", "ipfixer.yaml")."""
    return share_dir(name).joinpath(*parts)
