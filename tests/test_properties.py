"""Properties of attention, checked with hypothesis on drawn shapes, masks and inputs."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import examples
from hypothesis import example, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

import jattn

SETTINGS = settings(max_examples=examples(10))
# Jitted once per drawn shape: much faster than compiling every eager op anew.
dot_product_attention = jax.jit(jattn.dot_product_attention, static_argnames="return_weights")
self_attention = jax.jit(jattn.self_attention, static_argnames="is_causal")


def make_problem(B, T, S, K, G, H, D, seed, drop):
  """(q, k, v) with batch (B,), lengths T and S, heads N = K * G, sizes H and D, and a mask
  that drops each score with probability ``drop``."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, T, K * G, H)).astype(np.float32)
  k = rng.standard_normal((B, S, K, H)).astype(np.float32)
  v = rng.standard_normal((B, S, K, D)).astype(np.float32)
  mask = rng.random((B, K * G, T, S)) > drop
  return q, k, v, mask


@st.composite
def problems(draw):
  B, T, S = draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
  K, G = draw(st.integers(1, 2)), draw(st.integers(1, 2))
  H, D = draw(st.integers(1, 4)), draw(st.integers(1, 4))
  seed, drop = draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from([0.0, 0.3, 0.7]))
  return make_problem(B, T, S, K, G, H, D, seed, drop)


# Pinned edge cases: grouped heads (K=2, G=2) with T != S; a mask that hides everything.
GQA = make_problem(2, 5, 3, 2, 2, 3, 2, seed=0, drop=0.3)
ALL_MASKED = make_problem(1, 4, 6, 1, 2, 2, 3, seed=1, drop=1.0)


@SETTINGS
@given(problems())
@example(GQA)
@example(ALL_MASKED)
def test_rows_sum_to_one_where_anything_is_attended(problem):
  q, k, v, mask = problem
  _, w = dot_product_attention(q, k, v, mask=mask, return_weights=True)
  w = np.asarray(w)
  attended = mask.any(-1)
  assert_allclose(w.sum(-1), attended.astype(np.float32), rtol=1e-5, atol=1e-6)
  assert np.all(w[~np.broadcast_to(mask, w.shape)] == 0.0)
  assert np.all(w >= 0.0)


@SETTINGS
@given(problems(), st.floats(-50.0, 50.0))
@example(GQA, 50.0)
@example(ALL_MASKED, -50.0)
def test_adding_a_constant_to_all_scores_changes_nothing(problem, c):
  q, k, v, mask = problem
  base = dot_product_attention(q, k, v, mask=mask)
  shifted = dot_product_attention(q, k, v, mask=mask, bias=jnp.full((1, 1), c, jnp.float32))
  assert_allclose(shifted, base, rtol=1e-4, atol=1e-5)


@SETTINGS
@given(problems())
@example(GQA)
def test_agrees_with_jax_nn_on_attended_rows(problem):
  q, k, v, mask = problem
  v = np.concatenate([v] * q.shape[-1], -1)[..., : q.shape[-1]]  # jax.nn needs D == H
  mask = mask.copy()
  mask[..., 0] = True  # jax.nn returns a uniform average on fully masked rows
  assert_allclose(
    dot_product_attention(q, k, v, mask=mask),
    jax.nn.dot_product_attention(q, k, v, mask=mask),
    rtol=1e-5,
    atol=1e-5,
  )


@st.composite
def self_attention_problems(draw):
  T, F = draw(st.integers(2, 7)), draw(st.integers(1, 5))
  N, H = draw(st.integers(1, 3)), draw(st.integers(1, 4))
  seed = draw(st.integers(0, 2**32 - 1))
  params = jattn.init(
    jax.random.key(seed % 1000),
    F,
    H,
    num_heads=N,
    out_features=F,
    use_bias=True,
    bias_init=jax.nn.initializers.normal(0.5),
  )
  x = np.random.default_rng(seed).standard_normal((T, F)).astype(np.float32)
  return params, x, np.random.default_rng(seed + 1).permutation(T)


@SETTINGS
@given(self_attention_problems())
def test_self_attention_is_permutation_equivariant(problem):
  params, x, perm = problem
  assert_allclose(
    self_attention(params, x[perm]),
    self_attention(params, x)[perm],
    rtol=1e-4,
    atol=1e-5,
  )


@SETTINGS
@given(self_attention_problems(), st.data())
def test_causal_output_does_not_depend_on_later_inputs(problem, data):
  params, x, _ = problem
  T = x.shape[0]
  t = data.draw(st.integers(0, T - 2))
  changed = x.copy()
  changed[t + 1 :] = np.random.default_rng(t).standard_normal(changed[t + 1 :].shape) * 10
  before = self_attention(params, x, is_causal=True)
  after = self_attention(params, changed, is_causal=True)
  assert_allclose(after[: t + 1], before[: t + 1], rtol=1e-6, atol=1e-6)
  assert not np.allclose(after[t + 1 :], before[t + 1 :])
