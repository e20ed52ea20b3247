"""The README's Python examples run and say what they claim."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks
  for block in blocks:
    namespace = {}
    exec(compile(block, str(README), "exec"), namespace)
  np.testing.assert_allclose(namespace["y"].shape, (4, 128, 64))
  np.testing.assert_allclose(namespace["w"].shape, (4, 8, 128, 128))
