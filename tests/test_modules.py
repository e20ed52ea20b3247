"""The Flax modules: their params are the jattn pytree, and they compute what the pure API does."""

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

import jattn
import jattn.linen
import jattn.nnx


def shapes(tree):
  return jax.tree.map(jnp.shape, tree)


@pytest.fixture
def x(rng):
  return normal(rng, (2, 5, 8))


# --- linen ----------------------------------------------------------------------------------


def test_linen_params_are_the_jattn_pytree_and_outputs_match(x):
  module = jattn.linen.MultiHeadAttention(num_heads=4, head_dim=3, num_kv_heads=2, use_bias=True)
  variables = module.init(jax.random.key(0), x)
  expected = jattn.init(
    jax.random.key(1), 8, 3, num_heads=4, num_kv_heads=2, out_features=8, use_bias=True
  )
  assert shapes(variables) == {"params": shapes(expected)}
  # Any jattn pytree of those shapes goes straight in.
  out = module.apply({"params": expected}, x)
  np.testing.assert_allclose(out, jattn.self_attention(expected, x), atol=1e-6)


def test_linen_cross_attention_options_and_sown_weights(rng, x):
  x_kv = normal(rng, (2, 7, 6))
  module = jattn.linen.MultiHeadAttention(
    num_heads=2, head_dim=4, v_head_dim=3, out_features=5, is_causal=True
  )
  variables = module.init(jax.random.key(0), x, x_kv)
  lengths = jnp.array([3, 7])
  out, state = module.apply(
    variables,
    x,
    x_kv,
    key_value_seq_lengths=lengths,
    sow_weights=True,
    mutable=["intermediates"],
  )
  expected, weights = jattn.attention(
    variables["params"],
    x,
    x_kv,
    is_causal=True,
    key_value_seq_lengths=lengths,
    return_weights=True,
  )
  np.testing.assert_allclose(out, expected, atol=1e-6)
  (sown,) = state["intermediates"]["attention_weights"]
  np.testing.assert_allclose(sown, weights, atol=1e-6)
  assert out.shape == (2, 5, 5)


def test_linen_loads_flax_multi_head_attention_params_unchanged(x):
  flax_module = flax.linen.MultiHeadDotProductAttention(num_heads=4, qkv_features=16)
  flax_vars = flax_module.init(jax.random.key(0), x)
  ours = jattn.linen.MultiHeadAttention(num_heads=4, head_dim=4, use_bias=True)
  np.testing.assert_allclose(ours.apply(flax_vars, x), flax_module.apply(flax_vars, x), atol=1e-5)


def test_linen_without_out_projection_and_initializer_by_name(x):
  module = jattn.linen.MultiHeadAttention(
    num_heads=2, head_dim=16, use_out_projection=False, kernel_init="normal", stddev=0.5
  )
  variables = module.init(jax.random.key(0), x)
  assert "out" not in variables["params"]
  assert module.apply(variables, x).shape == (2, 5, 32)
  std = float(jnp.std(variables["params"]["query"]["kernel"]))
  assert 0.4 < std < 0.6


def test_linen_dropout_uses_the_dropout_stream(x):
  module = jattn.linen.MultiHeadAttention(num_heads=2, head_dim=4, dropout_rate=0.5)
  variables = module.init(jax.random.key(0), x, deterministic=True)
  clean = module.apply(variables, x, deterministic=True)
  np.testing.assert_array_equal(clean, jattn.self_attention(variables["params"], x))
  a = module.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  b = module.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  c = module.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0.01
  with pytest.raises(ValueError, match="deterministic"):
    module.apply(variables, x)


def test_linen_decode_equals_causal_attention(x):
  module = jattn.linen.MultiHeadAttention(num_heads=2, head_dim=4, num_kv_heads=1, decode=True)
  variables = module.init(jax.random.key(0), jnp.zeros((2, 6, 8)))  # max_len 6
  assert shapes(variables["cache"]) == {"index": (), "key": (2, 6, 1, 4), "value": (2, 6, 1, 4)}
  full = jattn.self_attention(variables["params"], x, is_causal=True)
  cache, outs = variables["cache"], []
  for t in range(5):
    out, mutated = module.apply(
      {"params": variables["params"], "cache": cache}, x[:, t : t + 1], mutable=["cache"]
    )
    cache = mutated["cache"]
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_linen_dtype_and_errors(x):
  module = jattn.linen.MultiHeadAttention(num_heads=2, head_dim=4, dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(0), x)
  assert variables["params"]["query"]["kernel"].dtype == jnp.float32  # param_dtype
  assert module.apply(variables, x).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match=r"\(\.\.\., seq, features\)"):
    module.apply(variables, x[0, 0])
  with pytest.raises(TypeError, match="drop inputs_kv"):
    jattn.linen.SelfAttention(num_heads=2, head_dim=4).init(jax.random.key(0), x, inputs_kv=x)


# --- nnx ------------------------------------------------------------------------------------


def test_nnx_params_are_the_jattn_pytree_in_and_out(x):
  module = jattn.nnx.MultiHeadAttention(
    8, num_heads=4, head_dim=3, num_kv_heads=2, use_bias=True, rngs=nnx.Rngs(0)
  )
  params = jattn.nnx.get_params(module)
  expected = jattn.init(
    jax.random.key(1), 8, 3, num_heads=4, num_kv_heads=2, out_features=8, use_bias=True
  )
  assert shapes(params) == shapes(expected)
  np.testing.assert_allclose(module(x), jattn.self_attention(params, x), atol=1e-6)
  jattn.nnx.set_params(module, expected)
  np.testing.assert_allclose(module(x), jattn.self_attention(expected, x), atol=1e-6)
  wrong = jattn.init(jax.random.key(1), 8, 5, num_heads=4, out_features=8)
  with pytest.raises(ValueError, match="do not fit"):
    jattn.nnx.set_params(module, wrong)


def test_nnx_loads_flax_nnx_multi_head_attention_params(x):
  theirs = nnx.MultiHeadAttention(4, 8, 16, decode=False, rngs=nnx.Rngs(0))
  theirs_params = nnx.to_pure_dict(nnx.state(theirs, nnx.Param))
  ours = jattn.nnx.MultiHeadAttention(8, num_heads=4, head_dim=4, use_bias=True, rngs=nnx.Rngs(1))
  jattn.nnx.set_params(ours, theirs_params)
  np.testing.assert_allclose(ours(x), theirs(x), atol=1e-5)


def test_nnx_sow_jit_grad_and_dropout(rng, x):
  module = jattn.nnx.MultiHeadAttention(
    8, num_heads=2, head_dim=4, is_causal=True, dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1)
  )

  forward = nnx.capture(
    lambda module, x: module(x, sow_weights=True, deterministic=True), nnx.Intermediate
  )
  out, intermediates = forward(module, x)
  params = jattn.nnx.get_params(module)
  expected, weights = jattn.self_attention(params, x, is_causal=True, return_weights=True)
  np.testing.assert_allclose(out, expected, atol=1e-6)
  (sown,) = nnx.to_pure_dict(intermediates)["attention_weights"]
  np.testing.assert_allclose(sown, weights, atol=1e-6)
  jitted = nnx.jit(lambda module, x: module(x, deterministic=True))
  np.testing.assert_allclose(jitted(module, x), expected, atol=1e-6)

  grads = nnx.grad(lambda m: jnp.sum(m(x, deterministic=True) ** 2))(module)
  pure = jax.grad(lambda p: jnp.sum(jattn.self_attention(p, x, is_causal=True) ** 2))(params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), nnx.to_pure_dict(grads), pure
  )
  a, b = module(x, deterministic=False), module(x, deterministic=False)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0.01  # the stream advances
  with pytest.raises(ValueError, match="deterministic"):
    module(x)


def test_nnx_decode_equals_causal_attention(x):
  module = jattn.nnx.MultiHeadAttention(8, num_heads=2, head_dim=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="init_cache"):
    module(x[:, :1], decode=True)
  module.init_cache((2, 6, 8))
  full = jattn.self_attention(jattn.nnx.get_params(module), x, is_causal=True)
  outs = [module(x[:, :2], decode=True)] + [
    module(x[:, t : t + 1], decode=True) for t in range(2, 5)
  ]
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
  assert int(module.cache["index"].get_value()) == 5


def test_nnx_self_attention_convenience(x):
  module = jattn.nnx.SelfAttention(8, num_heads=2, head_dim=4, out_features=3, rngs=nnx.Rngs(0))
  assert module(x).shape == (2, 5, 3)
  with pytest.raises(TypeError, match="drop inputs_kv"):
    module(x, inputs_kv=x)
