"""dot_product_attention and its pieces: agreement with jax.nn and Flax, masks, dtypes, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from numpy.testing import assert_allclose, assert_array_equal

import jattn


def qkv(rng, batch=(2,), T=5, S=7, N=4, K=4, H=8, D=8, dtype=np.float32):
  return (
    normal(rng, (*batch, T, N, H), dtype),
    normal(rng, (*batch, S, K, H), dtype),
    normal(rng, (*batch, S, K, D), dtype),
  )


# --- agreement with jax.nn.dot_product_attention ------------------------------------------


@pytest.mark.parametrize("K", [4, 2, 1])  # multi-head, grouped-query, multi-query
def test_matches_jax_nn(rng, K):
  q, k, v = qkv(rng, K=K)
  assert_allclose(
    jattn.dot_product_attention(q, k, v),
    jax.nn.dot_product_attention(q, k, v),
    rtol=1e-5,
    atol=1e-6,
  )


def test_matches_jax_nn_with_mask_bias_and_scale(rng):
  q, k, v = qkv(rng)
  mask = rng.random((2, 4, 5, 7)) > 0.3
  mask[..., 0] = True  # jax.nn averages fully masked rows; compare only well-defined rows
  bias = normal(rng, (2, 4, 5, 7))
  ours = jattn.dot_product_attention(q, k, v, mask=mask, bias=bias, scale=0.3)
  theirs = jax.nn.dot_product_attention(q, k, v, mask=mask, bias=bias, scale=0.3)
  assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_causal_top_left_matches_jax_nn(rng):
  q, k, v = qkv(rng, T=7, S=7)
  assert_allclose(
    jattn.dot_product_attention(q, k, v, is_causal=True),
    jax.nn.dot_product_attention(q, k, v, is_causal=True),
    rtol=1e-5,
    atol=1e-6,
  )
  q, k, v = qkv(rng, T=5, S=7)  # jax.nn aligns queries top-left
  assert_allclose(
    jattn.dot_product_attention(q, k, v, is_causal=True, alignment="top_left"),
    jax.nn.dot_product_attention(q, k, v, is_causal=True),
    rtol=1e-5,
    atol=1e-6,
  )


@pytest.mark.parametrize("window", [(2, 1), (0, 3), 1])
def test_sliding_window_matches_jax_nn(rng, window):
  q, k, v = qkv(rng, T=9, S=9)
  assert_allclose(
    jattn.dot_product_attention(q, k, v, local_window_size=window),
    jax.nn.dot_product_attention(q, k, v, local_window_size=window),
    rtol=1e-5,
    atol=1e-6,
  )


def test_key_value_lengths_match_jax_nn(rng):
  q, k, v = qkv(rng)
  lengths = np.array([3, 7], np.int32)
  assert_allclose(
    jattn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths),
    jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths),
    rtol=1e-5,
    atol=1e-6,
  )


def test_query_lengths_zero_padded_queries(rng):
  q, k, v = qkv(rng)
  out = jattn.dot_product_attention(q, k, v, query_seq_lengths=np.array([2, 5], np.int32))
  assert_array_equal(out[0, 2:], 0.0)
  assert_allclose(out[0, :2], jattn.dot_product_attention(q, k, v)[0, :2], rtol=1e-6)


# --- causal alignment ----------------------------------------------------------------------


def test_bottom_right_causal_is_what_decoding_needs(rng):
  """The last T queries of a causal pass over S positions equal a bottom-right pass of T queries."""
  q, k, v = qkv(rng, T=7, S=7)
  full = jattn.dot_product_attention(q, k, v, is_causal=True)
  for T in (1, 3):  # one decoding step; a chunk of a chunked prefill
    tail = jattn.dot_product_attention(q[:, -T:], k, v, is_causal=True)
    assert_allclose(tail, full[:, -T:], rtol=1e-5, atol=1e-6)


def test_causal_mask_alignments():
  assert_array_equal(jattn.causal_mask(2, 4), [[1, 1, 1, 0], [1, 1, 1, 1]])
  assert_array_equal(jattn.causal_mask(2, 4, alignment="top_left"), [[1, 0, 0, 0], [1, 1, 0, 0]])
  # More queries than keys, bottom-right: the first queries see nothing and output zero.
  assert_array_equal(jattn.causal_mask(3, 2), [[0, 0], [1, 0], [1, 1]])


# --- agreement with Flax, on the same params pytree ----------------------------------------


@pytest.mark.parametrize("use_bias", [False, True])
def test_self_attention_matches_flax_module(rng, use_bias):
  x = normal(rng, (2, 6, 16))
  module = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32, use_bias=use_bias)
  variables = module.init(jax.random.key(0), x)
  theirs = module.apply(variables, x)
  ours = jattn.self_attention(variables["params"], x)  # no conversion
  assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
  mask = nn.make_causal_mask(np.ones((2, 6))).astype(bool)
  assert_allclose(
    jattn.self_attention(variables["params"], x, is_causal=True),
    module.apply(variables, x, mask=mask),
    rtol=1e-5,
    atol=1e-5,
  )


def test_cross_attention_matches_flax_module(rng):
  x_q, x_kv = normal(rng, (3, 4, 8)), normal(rng, (3, 6, 8))
  module = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=5)
  variables = module.init(jax.random.key(1), x_q, x_kv)
  assert_allclose(
    jattn.attention(variables["params"], x_q, x_kv),
    module.apply(variables, x_q, x_kv),
    rtol=1e-5,
    atol=1e-5,
  )


def test_init_params_run_in_flax_module(rng):
  x = normal(rng, (2, 5, 12))
  params = jattn.init(jax.random.key(0), 12, 4, num_heads=3, out_features=12, use_bias=True)
  module = nn.MultiHeadDotProductAttention(num_heads=3, qkv_features=12, out_features=12)
  flax_shapes = jax.tree.map(jnp.shape, module.init(jax.random.key(0), x)["params"])
  assert jax.tree.map(jnp.shape, params) == flax_shapes
  assert_allclose(
    module.apply({"params": params}, x), jattn.self_attention(params, x), rtol=1e-5, atol=1e-5
  )


# --- masked-safe softmax --------------------------------------------------------------------


def test_fully_masked_rows_give_zero_output_and_finite_gradients(rng):
  q, k, v = qkv(rng, T=3, S=4)
  mask = np.ones((2, 4, 3, 4), bool)
  mask[:, :, 1] = False  # query 1 attends nothing
  out, weights = jattn.dot_product_attention(q, k, v, mask=mask, return_weights=True)
  assert_array_equal(out[:, 1], 0.0)
  assert_array_equal(weights[:, :, 1], 0.0)
  assert_allclose(weights[:, :, [0, 2]].sum(-1), 1.0, rtol=1e-6)

  def loss(q, k, v):
    return jnp.sum(jattn.dot_product_attention(q, k, v, mask=mask) ** 2)

  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.all(np.isfinite(g))
  assert_array_equal(grads[0][:, 1], 0.0)  # the masked query influences nothing


def test_minus_inf_bias_rows_are_zero_not_nan(rng):
  q, k, v = qkv(rng, T=2, S=3)
  bias = np.zeros((2, 4, 2, 3), np.float32)
  bias[:, :, 0] = -np.inf
  out = jattn.dot_product_attention(q, k, v, bias=bias)
  assert np.all(np.isfinite(out))
  assert_array_equal(out[:, 0], 0.0)


def test_softmax_is_stable_for_huge_scores():
  w = jattn.masked_softmax(jnp.array([1e30, 1e30, -1e30]))
  assert_allclose(w, [0.5, 0.5, 0.0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_computes_softmax_in_float32(rng, dtype):
  q, k, v = (jnp.asarray(a, dtype) for a in qkv(rng, H=64, D=64))
  out, weights = jattn.dot_product_attention(q, k, v, return_weights=True)
  assert out.dtype == dtype and weights.dtype == dtype
  scores = jattn.attention_scores(q, k)
  assert scores.dtype == jnp.float32
  reference = jattn.dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)))
  assert_allclose(np.asarray(out, np.float32), reference, atol=0.05)
  # Scores beyond float16's range (65504), which a float16 softmax could not hold.
  q_big, k_big = q * 80, k * 80
  assert np.abs(np.asarray(jattn.attention_scores(q_big, k_big, scale=1.0))).max() > 65504
  big = jattn.dot_product_attention(q_big, k_big, v, scale=1.0)
  reference = jattn.dot_product_attention(
    *(a.astype(jnp.float32) for a in (q_big, k_big, v)), scale=1.0
  )
  assert_allclose(np.asarray(big, np.float32), reference, atol=0.05)


# --- bad input: jattn's own errors at trace time, also under jit ----------------------------

BAD_CASES = {  # name: (shapes replacing the good ones, error, message)
  "head size mismatch": (dict(k=(2, 7, 4, 6)), ValueError, r"head sizes must match"),
  "kv length mismatch": (dict(v=(2, 6, 4, 8)), ValueError, r"same length"),
  "heads not a multiple": (dict(k=(2, 7, 3, 8), v=(2, 7, 3, 8)), ValueError, r"multiple of key"),
  "low rank": (dict(q=(5, 8)), ValueError, r"rank >= 3"),
  "batch mismatch": (dict(k=(3, 7, 4, 8), v=(3, 7, 4, 8)), ValueError, r"leading batch"),
}


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("jit", [False, True])
def test_bad_shapes_raise_clear_errors(rng, case, jit):
  shapes, error, match = BAD_CASES[case]
  q = normal(rng, shapes.get("q", (2, 5, 4, 8)))
  k = normal(rng, shapes.get("k", (2, 7, 4, 8)))
  v = normal(rng, shapes.get("v", (2, 7, 4, 8)))
  fn = jax.jit(jattn.dot_product_attention) if jit else jattn.dot_product_attention
  with pytest.raises(error, match=match):
    fn(q, k, v)


@pytest.mark.parametrize("jit", [False, True])
def test_bad_masks_and_biases(rng, jit):
  q, k, v = qkv(rng)

  def call(**kw):
    fn = lambda q, k, v: jattn.dot_product_attention(q, k, v, **kw)  # noqa: E731
    return (jax.jit(fn) if jit else fn)(q, k, v)

  with pytest.raises(TypeError, match=r"mask must be boolean"):
    call(mask=np.ones((5, 7), np.float32))
  with pytest.raises(ValueError, match=r"mask of shape \(5, 6\) does not broadcast.*\(2, 4, 5, 7"):
    call(mask=np.ones((5, 6), bool))
  with pytest.raises(ValueError, match=r"mask of shape \(3, 2, 4, 5, 7\)"):
    call(mask=np.ones((3, 2, 4, 5, 7), bool))  # would silently add a batch dimension
  with pytest.raises(ValueError, match=r"bias of shape \(4, 5\)"):
    call(bias=np.ones((4, 5), np.float32))
  with pytest.raises(ValueError, match=r"key_value_seq_lengths must have the batch shape \(2,\)"):
    call(key_value_seq_lengths=np.array([1, 2, 3], np.int32))
  with pytest.raises(ValueError, match=r"local_window_size must be non-negative"):
    call(local_window_size=(-1, 2))
  with pytest.raises(ValueError, match=r"alignment must be one of"):
    call(is_causal=True, alignment="center")


def test_empty_dimensions_are_errors_not_crashes(rng):
  q, k, v = qkv(rng)
  with pytest.raises(ValueError, match=r"empty dimensions"):
    jattn.dot_product_attention(q, k[..., :0, :], v[..., :0, :])
  with pytest.raises(ValueError, match=r"attention_scores expects"):
    jattn.attention_scores(q, k[..., :0, :])
  with pytest.raises(ValueError, match=r"attention_scores expects"):
    jattn.attention_scores(q, k[None].repeat(2, 0))
  with pytest.raises(ValueError, match=r"weighted_sum expects"):
    jattn.weighted_sum(np.ones((3, 4, 5, 7), np.float32), v)  # batch 3 against 2
  with pytest.raises(TypeError, match=r"share a floating dtype"):
    jattn.attention_scores(q, k.astype(np.float16))


def test_narrow_integer_lengths_do_not_wrap(rng):
  q = k = v = normal(rng, (1, 300, 1, 4))
  _, w = jattn.dot_product_attention(
    q, k, v, key_value_seq_lengths=np.array([10], np.uint8), return_weights=True
  )
  assert_array_equal(w[..., 10:], 0.0)
  assert_array_equal(jattn.padding_mask(np.array([3], np.int8), 300)[0, 0, 0, 3:], False)


def test_numpy_bool_is_causal(rng):
  q, k, v = qkv(rng, T=6, S=6)
  assert_array_equal(
    jattn.dot_product_attention(q, k, v, is_causal=np.True_),
    jattn.dot_product_attention(q, k, v, is_causal=True),
  )
  with pytest.raises(TypeError, match="is_causal must be a Python bool"):
    jattn.dot_product_attention(q, k, v, is_causal=1)


@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
def test_sliding_window_with_different_lengths(rng, alignment):
  q, k, v = qkv(rng, T=4, S=9)
  offset = 5 if alignment == "bottom_right" else 0
  i, j = np.indices((4, 9))
  expected = (j >= i + offset - 2) & (j <= i + offset + 1)
  assert_array_equal(jattn.sliding_window_mask(4, 9, (2, 1), alignment=alignment), expected)
  assert_allclose(
    jattn.dot_product_attention(q, k, v, local_window_size=(2, 1), alignment=alignment),
    jattn.dot_product_attention(q, k, v, mask=expected),
    rtol=1e-6,
  )


def test_float64_values_match_a_numpy_reference(rng):
  with jax.enable_x64(True):
    q, k, v = (a.astype(np.float64) for a in qkv(rng, batch=(), T=3, S=4, N=2, K=1, H=5, D=3))
    out = jattn.dot_product_attention(q, k, v, scale=0.7)
    scores = np.einsum("tnh,sh->nts", q, k[:, 0]) * 0.7
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    assert_allclose(out, np.einsum("nts,sd->tnd", w, v[:, 0]), rtol=1e-13)


def test_dtype_errors(rng):
  q, k, v = qkv(rng)
  with pytest.raises(TypeError, match=r"share a dtype"):
    jattn.dot_product_attention(q, k.astype(np.float16), v)
  with pytest.raises(TypeError, match=r"floating point"):
    jattn.dot_product_attention(q.astype(np.int32), k, v)


def test_no_leading_batch_dims(rng):
  q, k, v = qkv(rng, batch=())
  out, weights = jattn.dot_product_attention(q, k, v, return_weights=True)
  assert out.shape == (5, 4, 8) and weights.shape == (4, 5, 7)
  assert_allclose(
    out, jax.nn.dot_product_attention(q[None], k[None], v[None])[0], rtol=1e-5, atol=1e-6
  )


def test_value_head_size_may_differ(rng):
  q, k, v = qkv(rng, H=8, D=3)
  out = jattn.dot_product_attention(q, k, v)
  assert out.shape == (2, 5, 4, 3)
