"""Dropout on the attention weights, keyed by (batch, head, query, key) position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal

import jattn
from jattn import _dropout


def qkv(rng, batch=(2,), T=13, S=13, N=4, K=2, H=8, D=8):
  return (
    normal(rng, (*batch, T, N, H)),
    normal(rng, (*batch, S, K, H)),
    normal(rng, (*batch, S, K, D)),
  )


def test_dropped_weights_are_zero_kept_ones_rescaled_at_the_rate(rng):
  q, k, v = qkv(rng, batch=(2, 3), T=40, S=50)
  _, clean = jattn.dot_product_attention(q, k, v, implementation="naive", return_weights=True)
  _, dropped = jattn.dot_product_attention(
    q,
    k,
    v,
    implementation="naive",
    return_weights=True,
    dropout_rate=0.25,
    dropout_rng=jax.random.key(0),
  )
  kept = np.asarray(dropped) != 0
  assert abs(1 - kept.mean() - 0.25) < 0.01  # 96,000 weights: the rate to within 1%
  np.testing.assert_allclose(np.asarray(dropped)[kept], np.asarray(clean)[kept] / 0.75, rtol=1e-6)


def test_keep_bits_follow_the_documented_formula(rng):
  q, k, v = qkv(rng, batch=(2,), T=3, S=4, N=2, K=2)
  key = jax.random.key(42)
  _, w = jattn.dot_product_attention(
    q, k, v, implementation="naive", return_weights=True, dropout_rate=0.5, dropout_rng=key
  )
  threshold = np.uint32(2**31)
  for b in range(2):
    for n in range(2):
      for t in range(3):
        for s in range(4):
          folded = key
          for datum in (b, n, t, s):
            folded = jax.random.fold_in(folded, datum)
          keep = jax.random.key_data(folded)[0] >= threshold
          assert bool(w[b, n, t, s] != 0) == bool(keep)


@pytest.mark.parametrize("blocks", [(4, 4), (13, 13), (8, 5), (1, 13)])
def test_blockwise_drops_exactly_what_naive_drops_whatever_the_blocks(rng, blocks):
  q, k, v = qkv(rng)
  options = dict(is_causal=True, dropout_rate=0.3, dropout_rng=jax.random.key(7))
  naive, lse_naive = jattn.dot_product_attention(
    q, k, v, implementation="naive", return_lse=True, **options
  )
  block_q, block_kv = blocks
  blockwise, lse_blockwise = jattn.dot_product_attention(
    q,
    k,
    v,
    implementation="blockwise",
    block_q=block_q,
    block_kv=block_kv,
    return_lse=True,
    **options,
  )
  np.testing.assert_allclose(blockwise, naive, atol=2e-6)
  clean, lse_clean = jattn.dot_product_attention(
    q, k, v, implementation="naive", is_causal=True, return_lse=True
  )
  assert np.abs(np.asarray(naive) - np.asarray(clean)).max() > 0.1  # dropout did something
  # The log-sum-exp is that of the undropped weights, on both paths.
  np.testing.assert_allclose(lse_naive, lse_clean, rtol=1e-6)
  np.testing.assert_allclose(lse_blockwise, lse_clean, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_blockwise_dropout_gradients_and_jvp_match_naive(rng):
  q, k, v = qkv(rng, T=9, S=11)
  options = dict(dropout_rate=0.4, dropout_rng=jax.random.key(3), local_window_size=(4, 1))

  def loss(impl):
    def f(q, k, v):
      out = jattn.dot_product_attention(
        q, k, v, implementation=impl, block_q=4, block_kv=3, **options
      )
      return jnp.sum(jnp.sin(out))

    return f

  naive = jax.grad(loss("naive"), argnums=(0, 1, 2))(q, k, v)
  blockwise = jax.grad(loss("blockwise"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(naive, blockwise, strict=True):
    np.testing.assert_allclose(b, a, atol=1e-5)
  tangents = qkv(rng, T=9, S=11)
  _, jvp_naive = jax.jvp(loss("naive"), (q, k, v), tangents)
  _, jvp_blockwise = jax.jvp(loss("blockwise"), (q, k, v), tangents)
  np.testing.assert_allclose(jvp_blockwise, jvp_naive, rtol=1e-5, atol=1e-5)


def test_deterministic_and_zero_rate_are_exactly_no_dropout(rng):
  q, k, v = qkv(rng)
  clean = jattn.dot_product_attention(q, k, v)
  off = jattn.dot_product_attention(
    q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(0), deterministic=True
  )
  np.testing.assert_array_equal(off, clean)
  np.testing.assert_array_equal(jattn.dot_product_attention(q, k, v, dropout_rate=0.0), clean)


def test_different_rngs_drop_differently_and_legacy_keys_work(rng):
  q, k, v = qkv(rng)
  a = jattn.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(0))
  b = jattn.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(1))
  legacy = jattn.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(0))
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0.1
  np.testing.assert_allclose(legacy, a, atol=1e-6)


def test_fully_masked_rows_stay_zero_under_dropout(rng):
  q, k, v = qkv(rng, T=4, S=4)
  out = jattn.dot_product_attention(
    q,
    k,
    v,
    query_seq_lengths=jnp.array([2, 4]),
    dropout_rate=0.5,
    dropout_rng=jax.random.key(0),
  )
  np.testing.assert_array_equal(out[0, 2:], 0.0)


@pytest.mark.parametrize(
  ("options", "error", "message"),
  [
    (dict(dropout_rate=0.1), ValueError, "needs a dropout_rng"),
    (dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)), ValueError, r"in \[0, 1\)"),
    (dict(dropout_rate=-0.1, dropout_rng=jax.random.key(0)), ValueError, r"in \[0, 1\)"),
    (dict(dropout_rate="0.1", dropout_rng=jax.random.key(0)), TypeError, "must be a float"),
    (dict(dropout_rate=0.1, dropout_rng=jnp.zeros(3)), TypeError, "PRNG key"),
    (
      dict(dropout_rate=0.1, dropout_rng=jax.random.split(jax.random.key(0))),
      ValueError,
      "single key",
    ),
    (
      dict(dropout_rate=0.1, dropout_rng=jax.random.key(0), deterministic=1),
      TypeError,
      "deterministic must be a bool",
    ),
  ],
)
def test_bad_dropout_options_are_refused(rng, options, error, message):
  q, k, v = qkv(rng, T=3, S=3)
  with pytest.raises(error, match=message):
    jattn.dot_product_attention(q, k, v, **options)


def test_traced_rate_is_refused_but_traced_rng_is_fine(rng):
  q, k, v = qkv(rng, T=3, S=3)
  with pytest.raises(TypeError, match="static"):
    jax.jit(
      lambda r: jattn.dot_product_attention(q, k, v, dropout_rate=r, dropout_rng=jax.random.key(0))
    )(0.1)
  jitted = jax.jit(
    lambda key: jattn.dot_product_attention(q, k, v, dropout_rate=0.2, dropout_rng=key)
  )
  eager = jattn.dot_product_attention(q, k, v, dropout_rate=0.2, dropout_rng=jax.random.key(5))
  np.testing.assert_allclose(jitted(jax.random.key(5)), eager, atol=1e-6)


def test_check_dropout_returns_none_when_nothing_is_dropped():
  assert _dropout.check_dropout(0.0, None, False) is None
  assert _dropout.check_dropout(0.5, None, True) is None
