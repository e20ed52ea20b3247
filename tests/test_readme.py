"""The README's Python examples run and say what they claim."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert len(blocks) >= 3
  namespaces = []
  for block in blocks:
    namespace = {}
    exec(compile(block, str(README), "exec"), namespace)
    namespaces.append(namespace)
  quickstart = namespaces[0]
  (long_sequences,) = [n for n in namespaces if "hvp" in n]
  (modules,) = [n for n in namespaces if "layer" in n]
  (mods,) = [n for n in namespaces if "relative_bias" in n]
  assert mods["losses"][-1] < 1e-3 * mods["losses"][0]  # the table learned the teacher's scores
  np.testing.assert_allclose(quickstart["out"][0], [1.9366, 6.6831, 1.5951], atol=1e-4)
  assert quickstart["y"].shape == (4, 128, 64)
  assert quickstart["w"].shape == (4, 8, 128, 128)
  assert long_sequences["hvp"].shape == long_sequences["q"].shape
  assert long_sequences["rows"].shape == (1, 8, 2, 2048)
  np.testing.assert_allclose(long_sequences["rows"].sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(
    np.concatenate(modules["steps"], axis=1),
    modules["jattn"].self_attention(
      modules["jattn"].nnx.get_params(modules["layer"]), modules["x"], is_causal=True
    ),
    atol=1e-5,
  )
  assert modules["out"].shape == (2, 4, 32)
  assert float(modules["metrics"]["loss"]) > 0
