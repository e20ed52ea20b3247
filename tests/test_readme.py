"""The README's Python examples run and say what they claim."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
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
  jattn, params, x = modules["jattn"], modules["params"], modules["x"]
  np.testing.assert_allclose(  # "== jattn.self_attention(...)"
    modules["y"], jattn.self_attention(params, x, is_causal=True), atol=1e-5
  )
  np.testing.assert_allclose(  # a prompt chunk decoded into an empty cache is causal attention
    modules["out"], jattn.self_attention(params, x[:, :4], is_causal=True), atol=1e-5
  )
  check_training_step(modules)


def check_training_step(modules):
  """The README's one Optax step: its loss, and which leaves it moved."""
  jax, training, task = modules["jax"], modules["training"], modules["task"]
  before = training.init_model(jax.random.key(0), task)  # as the README built it
  batch = task.sample(jax.random.key(1), 64)
  # The reported loss is the cross-entropy of the model before the step, recomputed in NumPy
  # over the predicted positions (targets >= 0; recall predicts the last one only).
  logits = np.asarray(training.apply_model(before, batch["inputs"]), np.float64)
  targets = np.asarray(batch["targets"])
  predicted = targets >= 0
  assert predicted.sum() == 64
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_probs, np.maximum(targets, 0)[..., None], -1)[..., 0]
  np.testing.assert_allclose(modules["metrics"]["loss"], -picked[predicted].mean(), rtol=1e-5)
  # "frozen leaves stay bit-identical"; the others moved.
  model = modules["model"]
  jax.tree.map(np.testing.assert_array_equal, model["embed"], before["embed"])
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), model, before)
  assert all(jax.tree.leaves({k: v for k, v in moved.items() if k != "embed"})), moved


def _load(name: str):
  spec = importlib.util.spec_from_file_location(name, README.parent / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_ring_balance_table_is_what_ring_balance_counts():
  """README's zig-zag table is ``benchmarks/ring_balance.py``'s output, verbatim."""
  table = _load("ring_balance").balance_table()
  assert table.strip() in README.read_text()
  rows = [line.strip("|").split("|") for line in table.strip().splitlines()[2:]]
  ratios = {name.strip(): (float(a), float(b)) for name, a, b in rows}
  assert ratios["none (one causal sequence)"] == (1.87, 1.0)  # zig-zag balances one sequence
  assert ratios["2 documents: 4,608 and 3,584"] == (1.72, 1.97)  # and can lose with documents


def test_the_speed_table_is_the_committed_run():
  """benchmarks/README.md's ratio table is ``bench_attention.py --summary`` of the committed
  results.json, verbatim: the ratios quoted are those of one run, side by side."""
  table = _load("bench_attention").summary_table()
  assert table.strip() in (README.parent / "benchmarks" / "README.md").read_text()
  rows = [line.strip("|").split("|") for line in table.strip().splitlines()[2:]]
  assert {(v.strip(), m.strip()) for v, _, m, *_ in rows} >= {
    ("plain", "fwd"),
    ("plain", "fwd+bwd"),
    ("plain", "jvp"),
    ("causal", "fwd+bwd"),
    ("bf16", "fwd"),
    ("gqa", "fwd+bwd"),
    ("decode", "fwd"),
  }  # every case the speed issue asks to report
