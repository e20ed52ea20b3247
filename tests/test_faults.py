"""Nothing silent: what jattn guarantees under bad numbers and bad arguments.

- NaN in is NaN out, on every path (naive, blockwise, ring) and in every AD mode:
  a NaN (or an infinite score) in anything a query row attends makes that row's
  output, log-sum-exp, statistics, gradient and tangent NaN, and leaves the other
  rows alone. Fully masked rows stay exact zeros (log-sum-exp ``-inf``).
- Indices, cache positions, params keys, scales, PRNG keys and dtypes are checked
  at trace time and named in the error; traced values that cannot be checked
  there give NaN, never a silently wrong number.

Checkpoint and CLI faults are in tests/test_checkpoint.py and tests/test_cli.py;
NaN through the ring across 8 devices in tests/multidevice/ring_cases.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal

import jattn

T, N, H = 20, 2, 4
ROW = 13  # the query row that goes bad; tiles of 8 put it in the middle tile


def _impl(path):
  if path == "ring":
    return jattn.Ring(jax.make_mesh((1,), ("seq",)), "seq")
  return path


def _attend(path, **options):
  tiles = {"block_q": 8, "block_kv": 8} if path == "blockwise" else {}

  def f(q, k, v, scale=None):
    return jattn.dot_product_attention(
      q, k, v, scale=scale, implementation=_impl(path), return_lse=True, **tiles, **options
    )

  return f


def _qkv(rng):
  return tuple(jnp.asarray(normal(rng, (T, N, H))) for _ in range(3))


def _bad(x, value=np.nan):
  return x.at[ROW, 0, 1].set(value)


PATHS = ["naive", "blockwise", "ring"]


@pytest.mark.parametrize("path", PATHS)
def test_a_nan_query_makes_its_row_nan_and_only_its_row(path, rng):
  q, k, v = _qkv(rng)
  out, lse = _attend(path, is_causal=True)(_bad(q), k, v)
  assert np.isnan(out[ROW, 0]).all() and np.isnan(lse[0, ROW])
  rest = np.delete(np.asarray(out), ROW, axis=0)
  assert np.isfinite(rest).all() and np.isfinite(out[ROW, 1]).all()
  # The same data through the naive path: NaN where it is NaN, equal elsewhere.
  want, want_lse = _attend("naive", is_causal=True)(_bad(q), k, v)
  np.testing.assert_allclose(out, want, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_bad_key_poisons_exactly_the_rows_that_see_it(path, value, rng):
  # Causal: rows before ROW never see key ROW; the others see it in their tile.
  q, k, v = _qkv(rng)
  q = jnp.abs(q)  # positive queries: an infinite key gives +inf scores, not -inf
  f = _attend(path, is_causal=True)
  out, lse = f(q, _bad(k, value), v)
  assert np.isfinite(out[:ROW]).all() and np.isfinite(lse[:, :ROW]).all()
  assert np.isnan(out[ROW:, 0]).all() and np.isnan(lse[0, ROW:]).all()
  # Rows 8..12 share the bad key's tile but mask it: their tangents stay finite too
  # (a masked NaN score tangent times a zero weight would be NaN). Reverse mode cannot
  # promise that: dq = dS @ K multiplies the masked key by 0, and 0 * NaN is NaN, on
  # every path and in every library (as a masked NaN value is in the forward P @ V).
  tangent = jax.jvp(lambda q: f(q, _bad(k, value), v)[0], (q,), (jnp.ones_like(q),))[1]
  assert np.isfinite(tangent[:ROW]).all() and np.isnan(tangent[ROW:, 0]).all()


@pytest.mark.parametrize("path", ["naive", "blockwise"])  # the ring's scale is static
def test_a_traced_nan_scale_makes_every_row_nan(path, rng):
  q, k, v = _qkv(rng)
  out, lse = jax.jit(_attend(path))(q, k, v, jnp.float32(np.nan))
  assert np.isnan(out).all() and np.isnan(lse).all()


@pytest.mark.parametrize("path", PATHS)
def test_fully_masked_rows_stay_exact_zeros_beside_a_nan_row(path, rng):
  q, k, v = _qkv(rng)
  lengths = jnp.array(ROW + 1)  # rows past ROW attend nothing
  out, lse = _attend(path, query_seq_lengths=lengths)(_bad(q), k, v)
  assert np.isnan(out[ROW, 0]).all()
  assert (np.asarray(out[ROW + 1 :]) == 0).all() and np.isneginf(lse[:, ROW + 1 :]).all()


@pytest.mark.parametrize("path", PATHS)
def test_gradients_and_tangents_carry_the_nan(path, rng):
  q, k, v = _qkv(rng)
  f = _attend(path, is_causal=True)

  def loss(q):
    out, lse = f(q, k, v)
    return out.sum() + lse.sum()

  grad = jax.grad(loss)(_bad(q))
  assert np.isnan(grad[ROW, 0]).any()
  assert np.isfinite(np.delete(np.asarray(grad), ROW, axis=0)).all()
  _, (d_out, d_lse) = jax.jvp(lambda q: f(q, k, v), (_bad(q),), (jnp.ones_like(q),))
  assert np.isnan(d_out[ROW, 0]).all() and np.isnan(d_lse[0, ROW])
  assert np.isfinite(np.delete(np.asarray(d_out), ROW, axis=0)).all()


def test_stats_report_a_nan_row_as_nan_not_as_masked(rng):
  q, k, _ = _qkv(rng)
  stats = jattn.attention_stats(_bad(q), k, block_q=8, block_kv=8)
  for name, s in stats.items():
    assert np.isnan(s[0, ROW]), name
    assert np.isfinite(np.delete(np.asarray(s), ROW, axis=-1)).all(), name


def test_masked_softmax_normalises_or_propagates_never_neither():
  logits = jnp.array([[1.0, np.nan, 3.0], [1.0, 2.0, 3.0], [np.inf, 0.0, 1.0], [4.0, 5.0, 6.0]])
  mask = jnp.array([[True] * 3, [True] * 3, [True] * 3, [False] * 3])
  w = jattn.masked_softmax(logits, mask)
  assert np.isnan(w[0]).all() and np.isnan(w[2]).all()
  np.testing.assert_allclose(w[1], jax.nn.softmax(logits[1]), rtol=1e-6)
  assert (np.asarray(w[3]) == 0).all()
  # A NaN under the mask is masked, like any other score.
  masked_nan = jattn.masked_softmax(logits[0], jnp.array([True, False, True]))
  np.testing.assert_allclose(masked_nan, jax.nn.softmax(jnp.array([1.0, -np.inf, 3.0])))
  lse = jattn.masked_logsumexp(logits, mask)
  assert np.isnan(lse[0]) and np.isneginf(lse[3])


def test_weights_and_explain_show_a_nan_row(rng):
  params = jattn.init(jax.random.key(0), 4, 3, num_heads=2)
  x = jnp.asarray(normal(rng, (5, 4))).at[2, 0].set(np.nan)
  weights = jattn.explain(params, x, is_causal=True)["weights"]  # rows 2.. see input 2
  assert np.isnan(weights[:, 2:]).all()
  np.testing.assert_allclose(weights[:, :2].sum(-1), 1, rtol=1e-6)


@pytest.mark.parametrize(
  "options", [{"is_causal": True}, {"key_value_seq_lengths": jnp.array(4)}, {}]
)
def test_attention_weights_counts_negative_indices_from_the_end(options, rng):
  q, k, _ = _qkv(rng)
  full = jattn.attention_weights(q, k, **options)
  picked = jattn.attention_weights(q, k, queries=jnp.array([-1, 0, -T]), **options)
  np.testing.assert_allclose(picked, full[:, [T - 1, 0, 0]], rtol=1e-6)
  traced = jax.jit(lambda i: jattn.attention_weights(q, k, queries=i, **options))
  np.testing.assert_allclose(traced(jnp.array([-2])), full[:, [T - 2]], rtol=1e-6)


def test_attention_weights_rejects_or_nans_out_of_range_indices(rng):
  q, k, _ = _qkv(rng)
  for bad in ([T], [-T - 1], np.array([0, 99])):
    with pytest.raises(ValueError, match=f"out of range for {T} queries"):
      jattn.attention_weights(q, k, queries=bad)
  with pytest.raises(TypeError, match="1-D integer indices"):
    jattn.attention_weights(q, k, queries=np.array([1.0]))
  traced = jax.jit(lambda i: jattn.attention_weights(q, k, queries=i))(jnp.array([0, T]))
  assert np.isfinite(traced[:, 0]).all() and np.isnan(traced[:, 1]).all()


def _decode_setup(rng):
  params = jattn.init(jax.random.key(0), 4, 3, num_heads=2)
  return params, jnp.asarray(normal(rng, (1, 4))), jattn.init_cache(params, (), 6)


def test_decode_rejects_a_negative_index_and_nans_a_traced_one(rng):
  params, x, cache = _decode_setup(rng)
  cache = {**cache, "index": jnp.array(-1, jnp.int32)}
  with pytest.raises(ValueError, match="cache\\['index'\\] must be >= 0"):
    jattn.decode_step(params, cache, x)
  out, _ = jax.jit(jattn.decode_step)(params, cache, x)
  assert np.isnan(out).all()


def test_decode_rejects_an_integer_cache(rng):
  params, x, cache = _decode_setup(rng)
  cache = {**cache, "key": cache["key"].astype(jnp.int32)}
  with pytest.raises(TypeError, match=r"cache\['key'\] must be floating point.*int32"):
    jattn.decode_step(params, cache, x)


def test_init_cache_takes_integer_likes_and_names_bad_batch_shapes():
  params = jattn.init(jax.random.key(0), 4, 3)
  for shape in (2, (2,), [np.int64(2)], (np.int32(2),)):
    assert jattn.init_cache(params, shape, 5)["key"].shape == (2, 5, 1, 3)
  for bad, error in (((0,), ValueError), ((2.0,), TypeError), ("2", TypeError), (None, TypeError)):
    with pytest.raises(error, match="batch_shape must be a tuple of positive ints"):
      jattn.init_cache(params, bad, 5)


def test_unknown_params_keys_are_named(rng):
  params = jattn.init(jax.random.key(0), 4, 3, out_features=4, use_bias=True)
  x = jnp.asarray(normal(rng, (5, 4)))
  typo = {**params, "output": params.pop("out")}
  with pytest.raises(ValueError, match=r"unknown keys \['output'\].*'out'"):
    jattn.self_attention(typo, x)
  query = params["query"]
  capital = {**params, "query": {"kernel": query["kernel"], "Bias": query["bias"]}}
  with pytest.raises(ValueError, match="params\\['query'\\] has unknown keys \\['Bias'\\]"):
    jattn.self_attention(capital, x)
  with pytest.raises(TypeError, match="params\\['key'\\]\\['kernel'\\] must be an array"):
    jattn.self_attention({**params, "key": {"kernel": None}}, x)
  for dtype in (np.int32, np.bool_, np.complex64):  # non-float leaves
    kernel = np.ones(query["kernel"].shape, dtype)
    message = rf"\['kernel'\] must be floating point, got {kernel.dtype}"
    with pytest.raises(TypeError, match=message):
      jattn.self_attention({**params, "key": {"kernel": kernel}}, x)


@pytest.mark.parametrize(
  "scale, error, match",
  [
    ("big", TypeError, "scale must be a real scalar, got 'big'"),
    (1j, TypeError, "scale must be a real scalar, got 1j"),
    (float("nan"), ValueError, "scale must be finite, got nan"),
    (np.float32(np.inf), ValueError, "scale must be finite, got inf"),
  ],
)
def test_bad_static_scales_are_named(scale, error, match, rng):
  q, k, v = _qkv(rng)
  with pytest.raises(error, match=match):
    jattn.dot_product_attention(q, k, v, scale=scale)


@pytest.mark.parametrize(
  "rng_arg, match",
  [
    (0, "got int"),
    (jnp.zeros(2), "got float32\\[2\\]"),
    (jax.random.split(jax.random.key(0), 2), "got key<fry>\\[2\\]"),
  ],
)
def test_init_names_a_bad_rng(rng_arg, match):
  with pytest.raises(TypeError, match=f"rng must be one PRNG key.*{match}"):
    jattn.init(rng_arg, 4, 3)


def test_init_names_a_bad_dtype_and_takes_both_kinds_of_key():
  with pytest.raises(TypeError, match="dtype must be a floating-point dtype, got 'float33'"):
    jattn.init(jax.random.key(0), 4, 3, dtype="float33")
  typed = jattn.init(jax.random.key(0), 4, 3)
  raw = jattn.init(jax.random.PRNGKey(0), 4, 3)
  np.testing.assert_array_equal(typed["query"]["kernel"], raw["query"]["kernel"])


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.bool_])
def test_complex_or_boolean_inputs_are_named_not_cast(dtype):
  from flax import nnx

  from jattn import linen
  from jattn import nnx as jattn_nnx

  x = jnp.ones((2, 3, 4), dtype)
  calls = {
    "x": lambda: jattn.self_attention(jattn.init(jax.random.key(0), 4, 2), x),
    "inputs_q": lambda: linen.MultiHeadDotProductAttention(num_heads=2).init(jax.random.key(0), x),
    "inputs_k": lambda: jattn_nnx.MultiHeadAttention(2, 4, rngs=nnx.Rngs(0))(
      jnp.ones((2, 3, 4)), x
    ),
  }
  for name, call in calls.items():
    with pytest.raises(TypeError, match=f"{name} must hold real numbers.*{jnp.dtype(dtype)}"):
      call()


def test_tile_sizes_and_ring_arguments_are_checked_on_every_path(rng):
  q, k, v = _qkv(rng)
  for implementation in ("naive", "auto", "blockwise"):  # checked even where unused
    with pytest.raises(ValueError, match="block_q must be positive, got -3"):
      jattn.dot_product_attention(q, k, v, block_q=-3, implementation=implementation)
  mesh = jax.make_mesh((1,), ("seq",))
  with pytest.raises(TypeError, match=r"mesh must be a jax\.sharding\.Mesh, got str"):
    jattn.ring_attention(q, k, v, mesh="seq", axis_name="seq")
  with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\), got -1.0"):
    jattn.ring_attention(q, k, v, mesh=mesh, axis_name="seq", dropout_rate=-1.0, deterministic=True)
