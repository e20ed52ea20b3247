"""The Illustrated Self-Attention walkthrough, number for number (scale=1.0: it does not scale)."""

import jax
import numpy as np
from numpy.testing import assert_allclose, assert_array_equal

import jattn

KEYS = [[0, 1, 1], [4, 4, 0], [2, 3, 1]]
QUERIES = [[1, 0, 2], [2, 2, 2], [2, 1, 3]]
VALUES = [[1, 2, 3], [2, 8, 0], [2, 6, 3]]
SCORES = [[2, 4, 4], [4, 16, 12], [4, 12, 10]]  # every query dotted with every key


def softmax_rows(scores):
  e = np.exp(np.asarray(scores, np.float64))
  return e / e.sum(-1, keepdims=True)


def test_projections_are_the_walkthrough_tables():
  params, x = jattn.walkthrough_example()
  steps = jattn.explain(params, x, scale=1.0)
  assert_array_equal(steps["keys"], KEYS)
  assert_array_equal(steps["queries"], QUERIES)
  assert_array_equal(steps["values"], VALUES)


def test_input_one_scores_softmax_and_output():
  params, x = jattn.walkthrough_example()
  steps = jattn.explain(params, x, scale=1.0)
  assert_array_equal(steps["scores"][0], [2, 4, 4])
  assert_allclose(steps["weights"][0], [0.0634, 0.4683, 0.4683], atol=5e-5)
  # step 6: each value scaled by its weight
  assert_allclose(steps["weighted_values"][0], steps["weights"][0][:, None] * np.array(VALUES))
  assert_allclose(steps["outputs"][0], [1.9366, 6.6831, 1.5951], atol=5e-5)
  # The walkthrough's rounded figures are what jattn's step 6-7 gives its rounded softmax.
  rounded = jattn.weighted_sum(np.array([[[0.0, 0.5, 0.5]]]), steps["values"][:, None, :])
  assert_array_equal(rounded, [[[2.0, 7.0, 1.5]]])


def test_whole_attention_map_and_all_outputs():
  params, x = jattn.walkthrough_example()
  out, weights = jattn.self_attention(params, x, scale=1.0, return_weights=True)
  expected_map = softmax_rows(SCORES)
  assert_allclose(weights[0], expected_map, rtol=1e-5, atol=1e-7)
  assert_allclose(out, expected_map @ np.array(VALUES), rtol=1e-5)
  assert_allclose(out[1:], [[2.0000, 7.9640, 0.0540], [1.9997, 7.7599, 0.3584]], atol=5e-5)
  # rounded as the walkthrough prints them
  assert_allclose(np.round(out[1:], 1), [[2.0, 8.0, 0.1], [2.0, 7.8, 0.4]])


def test_explain_matches_self_attention_and_jits():
  params, x = jattn.walkthrough_example()
  steps = jax.jit(lambda p, x: jattn.explain(p, x, scale=1.0))(params, x)
  assert_allclose(steps["outputs"], jattn.self_attention(params, x, scale=1.0), rtol=1e-6)
  assert_allclose(steps["weighted_values"].sum(-2), steps["head_outputs"], rtol=1e-6)
  assert steps["mask"] is None


def test_default_scale_divides_scores_by_sqrt_head_size():
  params, x = jattn.walkthrough_example()
  steps = jattn.explain(params, x)
  assert_allclose(steps["scores"], np.array(SCORES) / np.sqrt(3), rtol=1e-6)
  assert_allclose(steps["weights"], softmax_rows(np.array(SCORES) / np.sqrt(3)), rtol=1e-5)


def test_integer_inputs_as_printed_are_promoted():
  params, _ = jattn.walkthrough_example()
  x = [[1, 0, 1, 0], [0, 2, 0, 2], [1, 1, 1, 1]]
  out = jattn.self_attention(params, np.array(x), scale=1.0)
  assert out.dtype == np.float32
  assert_allclose(out[0], [1.9366, 6.6831, 1.5951], atol=5e-5)
