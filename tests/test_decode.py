"""Decoding with a key/value cache equals causal attention over the whole sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal

import jattn


@pytest.fixture
def params():
  return jattn.init(
    jax.random.key(0),
    6,
    4,
    num_heads=4,
    num_kv_heads=2,
    v_head_dim=3,
    out_features=5,
    use_bias=True,
  )


@pytest.mark.parametrize("batch", [(), (2,), (2, 3)])
def test_token_by_token_equals_causal_attention(rng, params, batch):
  x = normal(rng, (*batch, 7, 6))
  full = jattn.self_attention(params, x, is_causal=True)
  cache = jattn.init_cache(params, batch, max_len=9)  # longer than needed: slots stay empty
  step = jax.jit(lambda c, x: jattn.decode_step(params, c, x))
  outs = []
  for t in range(7):
    out, cache = step(cache, x[..., t : t + 1, :])
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=-2), full, atol=1e-5)
  assert int(cache["index"]) == 7
  np.testing.assert_array_equal(cache["key"][..., 7:, :, :], 0.0)


@pytest.mark.slow
def test_chunked_prefill_then_decode_with_a_sliding_window(rng, params):
  x = normal(rng, (2, 10, 6))
  full = jattn.self_attention(params, x, is_causal=True, local_window_size=(3, 0))
  cache = jattn.init_cache(params, (2,), max_len=10)
  outs = []
  for start, stop in ((0, 4), (4, 7), (7, 8), (8, 10)):
    out, cache = jattn.decode_step(params, cache, x[:, start:stop], local_window_size=(3, 0))
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_blockwise_decoding_and_padding_lengths(rng, params):
  x = normal(rng, (2, 6, 6))
  lengths = jnp.array([4, 6])
  full = jattn.self_attention(params, x, is_causal=True, key_value_seq_lengths=lengths)
  cache = jattn.init_cache(params, (2,), max_len=6)
  outs = []
  for t in range(6):
    out, cache = jattn.decode_step(
      params,
      cache,
      x[:, t : t + 1],
      implementation="blockwise",
      block_kv=4,
      key_value_seq_lengths=lengths,
    )
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_cache_overflow_raises_eagerly_and_is_nan_under_jit(rng, params):
  x = normal(rng, (3, 6))
  cache = jattn.init_cache(params, (), max_len=4)
  _, cache = jattn.decode_step(params, cache, x)
  with pytest.raises(ValueError, match="cache is full"):
    jattn.decode_step(params, cache, x[:2])
  out, _ = jax.jit(lambda c, x: jattn.decode_step(params, c, x))(cache, x[:2])
  assert np.isnan(np.asarray(out)).all()


def test_cache_shape_and_option_errors(rng, params):
  x = normal(rng, (2, 1, 6))
  with pytest.raises(ValueError, match=r"the cache holds keys \(3, 5, 2, 4\)"):
    jattn.decode_step(params, jattn.init_cache(params, (3,), 5), x)
  with pytest.raises(TypeError, match="fixes them itself"):
    jattn.decode_step(params, jattn.init_cache(params, (2,), 5), x, is_causal=False)
  with pytest.raises(TypeError, match="init_cache"):
    jattn.decode_step(params, {"key": 1}, x)
  with pytest.raises(ValueError, match="do not fit a cache of max_len 1"):
    jattn.decode_step(params, jattn.init_cache(params, (2,), 1), normal(rng, (2, 2, 6)))
  with pytest.raises(ValueError, match="batch_shape"):
    jattn.init_cache(params, (0,), 4)
  with pytest.raises(TypeError, match="floating"):
    jattn.init_cache(params, (), 4, dtype=jnp.int32)
