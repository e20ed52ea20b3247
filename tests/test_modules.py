"""The Flax modules: Flax's arguments, params, rngs and numbers; jattn's pytree and options.

Flax's own tests, ported, and the parity of outputs, sown weights and gradients with Flax's
modules for the same variables are in ``test_flax_port.py``; this file checks the rest of
the drop-in (a Flax model's checkpoint loads by path and trains on, auto-names, initializer
fans, float masks, the dropout rng, precision, ``attention_fn``, errors for what jattn
cannot honour) and jattn's additions (params as the jattn pytree, jattn's options, chunked
decode).
"""

import flax.linen
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import normal
from flax import nnx

import jattn
import jattn.linen
import jattn.nnx


def shapes(tree):
  return jax.tree.map(jnp.shape, tree)


def perturbed(tree, seed=3):
  """Every leaf moved by noise: biases and LayerNorm scales nonzero/non-one, so they count."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  moved = [
    a + 0.3 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys, strict=True)
  ]
  return jax.tree.unflatten(treedef, moved)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  bits = jax.tree.map(lambda a: jax.random.key_data(a) if jax.dtypes.issubdtype(
    a.dtype, jax.dtypes.prng_key) else a, (a, b))  # fmt: skip
  jax.tree.map(np.testing.assert_array_equal, *bits)


@pytest.fixture
def x(rng):
  return normal(rng, (2, 5, 8))


# --- linen ----------------------------------------------------------------------------------


def test_linen_params_are_the_jattn_pytree_and_options_apply(rng, x):
  x_kv = normal(rng, (2, 7, 6))
  module = jattn.linen.MultiHeadDotProductAttention(
    num_heads=2, head_dim=4, num_kv_heads=1, v_head_dim=3, out_features=5, is_causal=True
  )
  variables = module.init(jax.random.key(0), x, x_kv)
  params = perturbed(variables["params"])
  expected = jattn.init(
    jax.random.key(1), 8, 4, num_heads=2, num_kv_heads=1, v_head_dim=3, kv_features=6,
    out_features=5, use_bias=True,
  )  # fmt: skip
  assert shapes(params) == shapes(expected)
  lengths = jnp.array([3, 7])
  out, state = module.apply(
    {"params": params}, x, x_kv, key_value_seq_lengths=lengths, sow_weights=True,
    mutable=["intermediates"],
  )  # fmt: skip
  reference, weights = jattn.attention(
    params, x, x_kv, is_causal=True, alignment="top_left", key_value_seq_lengths=lengths,
    return_weights=True,
  )  # fmt: skip
  np.testing.assert_allclose(out, reference, atol=1e-6)
  (sown,) = state["intermediates"]["attention_weights"]
  np.testing.assert_allclose(sown, weights, atol=1e-6)


class Block(flax.linen.Module):
  """A small Flax model that names its attention class, as user code does."""

  attention: type

  @flax.linen.compact
  def __call__(self, x, mask=None):
    h = flax.linen.Dense(8)(x)
    h = h + self.attention(num_heads=2, qkv_features=8)(h, mask=mask)
    return flax.linen.Dense(1)(h).squeeze(-1)


def _sgd_steps(apply, params, x, target, steps=3):
  optimizer = optax.sgd(0.05)  # linear in the gradients: Adam would amplify float noise
  state = optimizer.init(params)
  for _ in range(steps):
    grads = jax.grad(lambda p: jnp.mean((apply(p, x) - target) ** 2))(params)
    updates, state = optimizer.update(grads, state)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.slow
def test_linen_checkpoint_of_a_flax_model_loads_by_path_and_trains_on(rng, x):
  theirs, ours = (
    Block(flax.linen.MultiHeadDotProductAttention),
    Block(jattn.linen.MultiHeadDotProductAttention),
  )
  variables = theirs.init(jax.random.key(0), x)
  assert "MultiHeadDotProductAttention_0" in variables["params"]  # Flax's auto-name, both
  saved = flax.serialization.to_bytes(perturbed(variables))
  target = ours.init(jax.random.key(9), x)  # another seed: every value comes from the file
  restored = flax.serialization.from_bytes(target, saved)
  assert_trees_equal(restored, flax.serialization.from_bytes(variables, saved))
  mask = flax.linen.make_causal_mask(x[..., 0])  # Flax's float mask
  np.testing.assert_allclose(
    ours.apply(restored, x, mask), theirs.apply(restored, x, mask), rtol=1e-5, atol=1e-6
  )
  y = normal(rng, (2, 5))
  trained = [_sgd_steps(m.apply, restored, x, y) for m in (ours, theirs)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), *trained)
  query = [v["params"]["MultiHeadDotProductAttention_0"]["query"] for v in (trained[0], restored)]
  assert float(jnp.abs(query[0]["kernel"] - query[1]["kernel"]).max()) > 1e-3  # it trained


@pytest.mark.parametrize("shape", [(256, 8, 8), (64, 4, 32), (96, 12, 4)])
def test_initializer_callables_get_the_flat_matrix_fans(shape):
  """A callable initializer sees (F, N * H) and (N * H, O), as in Flax: std 1/sqrt(fan_in)."""
  F, N, H = shape
  init = jax.nn.initializers.lecun_normal()
  p = jattn.init(jax.random.key(0), F, H, num_heads=N, out_features=F, kernel_init=init)
  theirs = flax.linen.MultiHeadDotProductAttention(N, qkv_features=N * H, kernel_init=init)
  variables = theirs.init(jax.random.key(0), jnp.zeros((1, 1, F)))
  for name, fan_in in (("query", F), ("key", F), ("value", F), ("out", N * H)):
    ours = float(jnp.std(p[name]["kernel"]))
    theirs = float(jnp.std(variables["params"][name]["kernel"]))
    np.testing.assert_allclose(ours, fan_in**-0.5, rtol=0.1)
    np.testing.assert_allclose(ours, theirs, rtol=0.1)
  # uniform fan_avg too, on the 3-D kernel it would be sqrt(6 / (F + H)) instead
  p = jattn.init(
    jax.random.key(0), F, H, num_heads=N, kernel_init=jax.nn.initializers.xavier_uniform()
  )
  limit = (6 / (F + N * H)) ** 0.5
  np.testing.assert_allclose(float(jnp.abs(p["query"]["kernel"]).max()), limit, rtol=0.05)


def test_linen_dropout_rng_argument_takes_precedence(x):
  module = jattn.linen.MultiHeadDotProductAttention(num_heads=2, dropout_rate=0.5)
  variables = module.init(jax.random.key(0), x, deterministic=True)
  clean = module.apply(variables, x, deterministic=True)
  np.testing.assert_array_equal(clean, jattn.self_attention(variables["params"], x))

  def run(stream, arg=None):
    rngs = {"dropout": jax.random.key(stream)}
    return module.apply(variables, x, deterministic=False, rngs=rngs, dropout_rng=arg)

  np.testing.assert_array_equal(run(1), run(1))
  assert np.abs(np.asarray(run(1) - run(2))).max() > 0.01
  np.testing.assert_array_equal(run(1, jax.random.key(5)), run(2, jax.random.key(5)))
  with pytest.raises(ValueError, match="deterministic"):
    module.apply(variables, x)


def test_linen_decode_uses_flax_cache_names_and_equals_causal_attention(x):
  module = jattn.linen.MultiHeadDotProductAttention(
    num_heads=2, head_dim=4, num_kv_heads=1, decode=True
  )
  variables = module.init(jax.random.key(0), jnp.zeros((2, 6, 8)))  # max_len 6
  assert shapes(variables["cache"]) == {
    "cache_index": (),
    "cached_key": (2, 6, 1, 4),
    "cached_value": (2, 6, 1, 4),
  }
  full = jattn.self_attention(variables["params"], x, is_causal=True)
  cache, outs = variables["cache"], []
  for t0, t1 in ((0, 2), (2, 3), (3, 4), (4, 5)):  # a 2-token prefill, then one at a time
    out, mutated = module.apply(
      {"params": variables["params"], "cache": cache}, x[:, t0:t1], mutable=["cache"]
    )
    cache = mutated["cache"]
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
  assert int(cache["cache_index"]) == 5


def test_linen_float_masks_precision_and_attention_fn(x):
  theirs = flax.linen.MultiHeadDotProductAttention(num_heads=2)
  variables = perturbed(theirs.init(jax.random.key(0), x))
  # Keys 3 and 4 padded. (A query with every key masked differs on purpose: Flax gives it
  # the mean of all values, jattn zeros; see README "Switching from Flax".)
  mask = flax.linen.make_attention_mask(jnp.ones((2, 5)), jnp.array([[1, 1, 1, 0, 0]] * 2))
  expected = theirs.apply(variables, x, mask=mask)
  for kwargs in (
    {},
    dict(precision="highest"),
    dict(precision=jax.lax.Precision.HIGHEST),
    dict(attention_fn=flax.linen.dot_product_attention),
    dict(force_fp32_for_softmax=True),
  ):
    ours = jattn.linen.MultiHeadDotProductAttention(num_heads=2, **kwargs)
    np.testing.assert_allclose(ours.apply(variables, x, mask=mask), expected, atol=2e-6)
    np.testing.assert_allclose(ours.apply(variables, x, mask=mask != 0), expected, atol=2e-6)


def test_linen_errors_name_the_argument(x):
  def init(x=x, **kwargs):
    module = jattn.linen.MultiHeadDotProductAttention(**{"num_heads": 2, **kwargs})
    return module.init(jax.random.key(0), x)

  for name in ("qkv_dot_general", "out_dot_general", "qk_attn_weights_einsum_cls"):
    with pytest.raises(NotImplementedError, match=name):
      init(**{name: jax.lax.dot_general})
  with pytest.raises(ValueError, match=r"qkv_features \(7\) must be divisible by num_heads"):
    init(qkv_features=7)
  with pytest.raises(TypeError, match=r"inputs_q .*complex64"):
    init(x=x.astype(jnp.complex64))
  with pytest.raises(ValueError, match="precision"):
    init(precision=("highest", "default"))
  with pytest.raises(
    ValueError, match=r"attention_fn cannot apply jattn's options \['is_causal'\]"
  ):
    init(attention_fn=flax.linen.dot_product_attention, is_causal=True)
  module = jattn.linen.MultiHeadDotProductAttention(num_heads=2)
  with pytest.raises(TypeError, match=r"unknown call arguments \['q_segment'\]"):
    module.init(jax.random.key(0), x, q_segment=x[..., 0])
  with pytest.raises(ValueError, match=r"\(\.\.\., seq, features\)"):
    module.init(jax.random.key(0), x[0, 0])


def test_linen_dtype_and_self_attention(x):
  module = jattn.linen.MultiHeadDotProductAttention(num_heads=2, dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(0), x)
  assert variables["params"]["query"]["kernel"].dtype == jnp.float32  # param_dtype
  assert module.apply(variables, x).dtype == jnp.bfloat16
  mask = flax.linen.make_causal_mask(x[..., 0])
  self_attention = jattn.linen.SelfAttention(num_heads=2)
  np.testing.assert_array_equal(  # Flax's positional call: (inputs_q, mask)
    self_attention.apply(variables, x, mask),
    jattn.linen.MultiHeadDotProductAttention(num_heads=2).apply(variables, x, mask=mask),
  )


# --- nnx ------------------------------------------------------------------------------------


class NnxBlock(nnx.Module):
  def __init__(self, attention, rngs):
    self.dense = nnx.Linear(8, 8, rngs=rngs)
    self.attention = attention(2, 8, decode=False, dropout_rate=0.1, rngs=rngs)
    self.head = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    h = self.dense(x)
    return self.head(h + self.attention(h, deterministic=True)).squeeze(-1)


@pytest.mark.slow
def test_nnx_checkpoint_of_a_flax_model_loads_by_path_and_trains_on(rng, x):
  theirs = NnxBlock(nnx.MultiHeadAttention, nnx.Rngs(0))
  ours = NnxBlock(jattn.nnx.MultiHeadAttention, nnx.Rngs(9))
  nnx.update(theirs, perturbed(nnx.state(theirs, nnx.Param)))
  assert shapes(nnx.state(ours)) == shapes(nnx.state(theirs))  # every path, the rngs' too
  saved = flax.serialization.msgpack_serialize(nnx.to_pure_dict(nnx.state(theirs, nnx.Param)))
  state = nnx.state(ours, nnx.Param)
  nnx.replace_by_pure_dict(state, flax.serialization.msgpack_restore(saved))
  nnx.update(ours, state)
  assert_trees_equal(*(nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (ours, theirs)))
  np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
  y = normal(rng, (2, 5))
  for model in (ours, theirs):
    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
    for _ in range(3):
      grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
      optimizer.update(model, grads)
  ours_p, theirs_p = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (ours, theirs))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), ours_p, theirs_p)


def test_nnx_params_are_the_jattn_pytree_in_and_out(x):
  module = jattn.nnx.MultiHeadAttention(4, 8, head_dim=3, num_kv_heads=2, rngs=nnx.Rngs(0))
  params = jattn.nnx.get_params(module)
  expected = jattn.init(
    jax.random.key(1), 8, 3, num_heads=4, num_kv_heads=2, out_features=8, use_bias=True
  )
  assert shapes(params) == shapes(expected)
  np.testing.assert_allclose(module(x), jattn.self_attention(params, x), atol=1e-6)
  expected = perturbed(expected)
  jattn.nnx.set_params(module, expected)
  np.testing.assert_allclose(module(x), jattn.self_attention(expected, x), atol=1e-6)
  wrong = jattn.init(jax.random.key(1), 8, 5, num_heads=4, out_features=8)
  with pytest.raises(ValueError, match="do not fit"):
    jattn.nnx.set_params(module, wrong)


def test_nnx_sow_jit_grad_dropout_and_metadata(x):
  module = jattn.nnx.MultiHeadAttention(
    2, 8, is_causal=True, dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1),
    kernel_metadata={"note": "attention kernel"},
  )  # fmt: skip
  assert module.query.kernel.note == module.out.kernel.note == "attention kernel"
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
  c = module(x, deterministic=False, rngs=nnx.Rngs(dropout=7))
  np.testing.assert_array_equal(c, module(x, deterministic=False, rngs=nnx.Rngs(dropout=7)))
  # sow_weights stores the weights as applied, after dropout (Flax: before): kept weights are
  # the clean ones over 1 - rate = 0.5, dropped ones zero.
  dropped = nnx.capture(
    lambda module, x: module(x, sow_weights=True, deterministic=False), nnx.Intermediate
  )
  (sown,) = nnx.to_pure_dict(dropped(module, x)[1])["attention_weights"]
  sown, weights = np.asarray(sown), np.asarray(weights)
  kept = sown != 0
  assert 0.3 < kept[weights > 0].mean() < 0.7
  np.testing.assert_allclose(sown[kept], weights[kept] / 0.5, rtol=1e-5)
  with pytest.raises(ValueError, match="deterministic"):
    module(x)


def test_nnx_decode_flag_cache_names_and_view(x):
  module = jattn.nnx.MultiHeadAttention(2, 8, head_dim=4, decode=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="init_cache"):
    module(x[:, :1])
  module.init_cache((2, 6, 8))
  cache = nnx.to_pure_dict(nnx.state(module, nnx.Cache))
  assert shapes(cache) == {
    "cache_index": (),
    "cached_key": (2, 6, 2, 4),
    "cached_value": (2, 6, 2, 4),
  }
  full = jattn.self_attention(jattn.nnx.get_params(module), x, is_causal=True)
  outs = [module(x[:, :2])] + [module(x[:, t : t + 1]) for t in range(2, 5)]
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
  assert int(module.cache_index[...]) == 5
  np.testing.assert_allclose(module(x, decode=False), jattn.self_attention(
    jattn.nnx.get_params(module), x), atol=1e-6)  # fmt: skip

  fresh = jattn.nnx.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
  viewed = nnx.view(fresh, decode=True, batch_size=2, max_length=6)
  assert viewed.cached_key.shape == (2, 6, 2, 4)
  np.testing.assert_allclose(viewed(x[:, :1]), full[:, :1], atol=1e-5)


def test_nnx_errors_name_the_argument(x):
  def make(**kwargs):
    return jattn.nnx.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0), **kwargs)

  for name in ("qkv_promote_dtype", "qkv_dot_general", "out_dot_general_cls"):
    with pytest.raises(NotImplementedError, match=name):
      make(**{name: lambda *a, **k: a})
  make(qkv_promote_dtype=flax.nnx.nn.dtypes.promote_dtype)  # Flax's default is fine
  theirs = nnx.MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0))
  ours = make(attention_fn=flax.nnx.dot_product_attention)  # is_causal reaches it, as in Flax
  np.testing.assert_allclose(ours(x, is_causal=True), theirs(x, is_causal=True), atol=1e-6)
  with pytest.raises(NotImplementedError, match="out_sharding"):
    make()(x, out_sharding=("a",))
  with pytest.raises(ValueError, match=r"in_features=8"):
    make()(x[..., :4])
  with pytest.raises(TypeError, match=r"inputs_k .*bool"):
    make()(x, x > 0)
  with pytest.raises(TypeError, match="drop inputs_k"):
    jattn.nnx.SelfAttention(2, 8, rngs=nnx.Rngs(0))(x, inputs_k=x)
