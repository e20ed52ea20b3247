"""ruff's lint and format checks are part of the suite, so CI enforces them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
  # The ruff installed beside this interpreter (a venv need not be on PATH), else any.
  ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
  if ruff is None:
    pytest.skip("ruff is not installed (it is in the test extra)")
  result = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
