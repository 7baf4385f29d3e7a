"""The pipeline's layering (ARCHITECTURE.md) is a checked fact: import-linter's layers contract in
pyproject.toml fails when a module imports from a room above its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lint_imports() -> str:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return exe


def test_no_import_runs_back_up_the_pipeline() -> None:
    proc = subprocess.run([_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_every_room_is_in_the_contract() -> None:
    """A new top-level module or package must be placed in a layer ."""
    text = (ROOT / "pyproject.toml").read_text()
    shared = {"__init__"}
    rooms = {p.stem for p in (ROOT / "ipfixer").iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    missing = sorted(r for r in rooms - shared if f'ipfixer.{r}"' not in text and f"ipfixer.{r} " not in text)
    assert not missing, f"modules in no layer of [tool.importlinter]: {missing}"
