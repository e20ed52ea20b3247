"""jit, vmap and grad compose with jattn: equal results, correct gradients, no retracing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from jax.test_util import check_grads
from numpy.testing import assert_allclose

import jattn

OPTION_SETS = {
  "plain": {},
  "causal": dict(is_causal=True),
  "mask+bias": "mask",  # filled in per shape below
  "window+lengths": dict(local_window_size=(1, 1), key_value_seq_lengths="lengths"),
}


def options_for(name, rng, batch, N, T, S):
  opts = OPTION_SETS[name]
  if opts == "mask":
    mask = rng.random((*batch, N, T, S)) > 0.3
    mask[..., 1, :] = False  # a fully masked query: gradients must stay finite
    return dict(mask=mask, bias=normal(rng, (*batch, N, T, S)))
  if opts.get("key_value_seq_lengths") == "lengths":
    return dict(opts, key_value_seq_lengths=np.full(batch, S - 1, np.int32))
  return dict(opts)


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTION_SETS)
def test_check_grads_dot_product_attention(rng, name):
  with jax.enable_x64(True):
    q = normal(rng, (2, 4, 4, 3), np.float64)
    k = normal(rng, (2, 4, 2, 3), np.float64)  # grouped heads
    v = normal(rng, (2, 4, 2, 5), np.float64)
    opts = options_for(name, rng, (2,), 4, 4, 4)
    fn = functools.partial(jattn.dot_product_attention, **opts)
    check_grads(fn, (q, k, v), order=2, modes=("fwd", "rev"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "causal", "mask+bias"])
def test_check_grads_self_attention(rng, name):
  with jax.enable_x64(True):
    params = jattn.init(
      jax.random.key(0), 6, 3, num_heads=2, out_features=4, use_bias=True, dtype=jnp.float64
    )
    params = jax.tree.map(lambda a: a + 0.1, params)  # non-zero biases
    x = normal(rng, (2, 5, 6), np.float64)
    opts = options_for(name, rng, (2,), 2, 5, 5)
    fn = functools.partial(jattn.self_attention, **opts)
    check_grads(fn, (params, x), order=2, modes=("fwd", "rev"))


def test_check_grads_float32_walkthrough():
  params, x = jattn.walkthrough_example()
  check_grads(
    lambda p, x: jattn.self_attention(p, x, scale=0.3),
    (params, x * 0.5),
    order=1,
    modes=("fwd", "rev"),
    atol=2e-2,
    rtol=2e-2,
  )


def test_float64_stays_float64(rng):
  with jax.enable_x64(True):
    q = normal(rng, (3, 2, 4), np.float64)
    out, w = jattn.dot_product_attention(q, q, q, return_weights=True)
    assert out.dtype == jnp.float64 and w.dtype == jnp.float64
    assert jattn.attention_scores(q, q).dtype == jnp.float64


def test_jit_equals_eager(rng):
  q, k, v = normal(rng, (2, 5, 4, 8)), normal(rng, (2, 6, 2, 8)), normal(rng, (2, 6, 2, 8))
  mask = rng.random((2, 1, 5, 6)) > 0.2
  fn = functools.partial(jattn.dot_product_attention, is_causal=True, return_weights=True)
  eager = fn(q, k, v, mask=mask)
  jitted = jax.jit(fn)(q, k, v, mask=mask)
  jax.tree.map(lambda a, b: assert_allclose(a, b, rtol=1e-6, atol=1e-7), eager, jitted)


def test_vmap_equals_batch_dims_equals_loop(rng):
  params = jattn.init(jax.random.key(0), 8, 4, num_heads=2, out_features=8)
  x = normal(rng, (3, 2, 5, 8))  # two leading batch dimensions
  batched = jattn.self_attention(params, x, is_causal=True)
  vmapped = jax.vmap(jax.vmap(lambda x: jattn.self_attention(params, x, is_causal=True)))(x)
  looped = np.stack(
    [
      np.stack([jattn.self_attention(params, x[i, j], is_causal=True) for j in range(2)])
      for i in range(3)
    ]
  )
  assert_allclose(vmapped, batched, rtol=1e-5, atol=1e-6)
  assert_allclose(looped, batched, rtol=1e-5, atol=1e-6)


def test_vmap_over_params(rng):
  """Per-example (ensemble) parameters: vmap over the pytree itself."""
  keys = jax.random.split(jax.random.key(0), 3)
  ensemble = jax.vmap(lambda key: jattn.init(key, 4, 3))(keys)
  x = normal(rng, (5, 4))
  out = jax.vmap(jattn.self_attention, in_axes=(0, None))(ensemble, x)
  for i in range(3):
    member = jax.tree.map(lambda a, i=i: a[i], ensemble)
    assert_allclose(out[i], jattn.self_attention(member, x), rtol=1e-5, atol=1e-6)


def test_every_parameter_gets_a_finite_nonzero_gradient(rng):
  params = jattn.init(
    jax.random.key(0),
    8,
    4,
    num_heads=4,
    num_kv_heads=2,
    out_features=8,
    use_bias=True,
    bias_init=jax.nn.initializers.normal(0.1),
  )
  x = normal(rng, (2, 6, 8))
  target = normal(rng, (2, 6, 8))
  loss = lambda p: jnp.mean((jattn.self_attention(p, x, is_causal=True) - target) ** 2)  # noqa: E731
  grads = jax.grad(loss)(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), path
    if path[0].key == "key" and path[1].key == "bias":
      # The key bias adds one constant to all of a query's scores, which softmax
      # ignores: its true gradient is zero, in any attention layer.
      assert_allclose(g, 0.0, atol=1e-6)
    else:
      assert np.abs(g).max() > 1e-4, path


def test_gradient_with_respect_to_future_inputs_is_zero_when_causal(rng):
  params = jattn.init(jax.random.key(0), 4, 3, num_heads=2)
  x = normal(rng, (6, 4))
  jac = jax.jacrev(lambda x: jattn.self_attention(params, x, is_causal=True))(x)  # (T, O, T, F)
  for t in range(6):
    assert np.all(np.asarray(jac[t, :, t + 1 :]) == 0.0)
    assert np.any(np.asarray(jac[t, :, : t + 1]) != 0.0)


def test_jitted_call_does_not_retrace(rng):
  traces = []

  @jax.jit
  def step(params, x):
    traces.append(None)
    return jattn.self_attention(params, x, is_causal=True)

  params = jattn.init(jax.random.key(0), 8, 4, num_heads=2)
  step(params, normal(rng, (2, 5, 8)))
  step(params, normal(rng, (2, 5, 8)))
  step(jattn.init(jax.random.key(1), 8, 4, num_heads=2), normal(rng, (2, 5, 8)))
  assert len(traces) == 1


def test_params_are_a_pytree_optax_trains(rng):
  import optax

  params = jattn.init(jax.random.key(0), 4, 3, num_heads=2, out_features=4)
  x, target = normal(rng, (8, 5, 4)), normal(rng, (8, 5, 4))
  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(
      lambda p: jnp.mean((jattn.self_attention(p, x) - target) ** 2)
    )(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  losses = []
  for _ in range(30):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0]
