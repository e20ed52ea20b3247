"""Gradients: check_grads (order 2, forward and reverse) of every public function and module.

Everything runs in float64, so ``check_grads``'s default tolerances are tight.
``test_blockwise.py`` checks the blockwise path of ``dot_product_attention``,
``test_composition.py`` its naive path under masks, windows and lengths, and
``test_dropout.py`` that blockwise dropout has the naive gradients. Here are the
other entry points and both Flax modules, whose gradients must be those of the
pure function on the same parameters.

Speed: ``check_grads`` runs op by op (not jitted) and every test uses the same
few shapes, so each operation compiles once for the whole file; a jitted check
would compile about a dozen programs of its own.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx
from jax.test_util import check_grads
from numpy.testing import assert_allclose, assert_array_equal

import jattn
import jattn.linen
import jattn.nnx

B, T, F, N, K, H, D = 2, 4, 5, 2, 1, 3, 2  # batch, length, features, heads, kv heads, head sizes
PARAM_SHAPES = {  # grouped-query (K < N), D != H, biases, an out projection back to F
  "query": {"kernel": (F, N, H), "bias": (N, H)},
  "key": {"kernel": (F, K, H), "bias": (K, H)},
  "value": {"kernel": (F, K, D), "bias": (K, D)},
  "out": {"kernel": (N, D, F), "bias": (F,)},
}
# Module attributes that give those shapes.
MODULE_OPTIONS = dict(num_heads=N, head_dim=H, num_kv_heads=K, v_head_dim=D, use_bias=True)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def check(fn, *args):
  """Second-order forward- and reverse-mode check of ``fn`` at ``args`` (pytrees)."""
  check_grads(fn, args, order=2, modes=("fwd", "rev"))


def loss(y):
  """A scalar loss with a non-constant gradient."""
  return jnp.sum(jnp.sin(y) + y * y)


def grads_of(fn, *args):
  """The gradients of ``loss(fn(*args))`` with respect to every argument."""
  return jax.grad(lambda *a: loss(fn(*a)), argnums=tuple(range(len(args))))(*args)


def random_params(rng, shapes=PARAM_SHAPES, dtype=np.float64):
  """A pytree ``{name: {leaf: array}}`` of normals (biases too: zero ones hide gradients).

  The standard deviation, 0.5, keeps the softmax smooth enough for second-order finite
  differences.
  """
  return {
    name: {leaf: 0.5 * normal(rng, shape, dtype) for leaf, shape in entry.items()}
    for name, entry in shapes.items()
  }


def assert_trees_close(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: assert_allclose(x, y, **tol), a, b)


# --- dot_product_attention -------------------------------------------------------------------


@pytest.mark.slow
def test_dot_product_attention_with_dropout_and_every_output(rng, x64):
  """Naive path with dropout (its keep bits are fixed by the rng: a smooth function), mask,
  causal, a differentiated bias and scale, K < N, D != H, weights and lse as outputs."""
  q, k, v = (normal(rng, (B, T, n, h), np.float64) for n, h in ((N, H), (K, H), (K, D)))
  bias = normal(rng, (B, 1, T, T), np.float64)
  mask = rng.random((B, 1, T, T)) > 0.3
  mask[..., 0] = True  # every query attends something: the log-sum-exp is finite
  attend = functools.partial(
    jattn.dot_product_attention,
    mask=mask,
    is_causal=True,
    implementation="naive",
    return_weights=True,
    return_lse=True,
  )
  dropped = functools.partial(attend, dropout_rate=0.3, dropout_rng=jax.random.key(0))
  out, weights, lse = dropped(q, k, v, bias=bias)
  assert out.shape == (B, T, N, D) and weights.shape == (B, N, T, T) and lse.shape == (B, N, T)
  _, kept, _ = attend(q, k, v, bias=bias)
  assert np.any((np.asarray(weights) == 0) & (np.asarray(kept) > 0))  # dropout dropped some
  check(lambda q, k, v, b, s: dropped(q, k, v, bias=b, scale=s), q, k, v, bias, 0.7)


# --- attention, self_attention, explain -----------------------------------------------------


def test_attention_cross_with_key_lengths(rng, x64):
  """Cross-attention: queries from one input attend keys and values of another, cut to lengths;
  the weights as an output too."""
  p = random_params(rng)
  x_q, x_kv = normal(rng, (B, T, F), np.float64), normal(rng, (B, T, F), np.float64)
  attend = functools.partial(
    jattn.attention,
    is_causal=True,
    key_value_seq_lengths=np.array([T, 2], np.int32),
    return_weights=True,
  )
  out, weights = attend(p, x_q, x_kv)
  assert out.shape == (B, T, F) and weights.shape == (B, N, T, T)
  assert_array_equal(np.asarray(weights)[1, :, :, 2:], 0.0)  # beyond the length
  check(attend, p, x_q, x_kv)


def test_self_attention_and_every_step_of_explain(rng, x64):
  p = random_params(rng)
  x = normal(rng, (B, T, F), np.float64)

  def both(p, x):
    steps = jattn.explain(p, x, is_causal=True)
    assert steps["mask"].dtype == bool
    return {n: a for n, a in steps.items() if n != "mask"}, jattn.self_attention(
      p, x, is_causal=True
    )

  steps, out = both(p, x)
  assert out.shape == (B, T, F) and steps["weighted_values"].shape == (B, N, T, T, D)
  assert_allclose(steps["outputs"], out, rtol=1e-14)
  check(both, p, x)


# --- the steps -------------------------------------------------------------------------------


def test_scores_softmax_logsumexp_weighted_sum_and_weights_of_slices(rng, x64):
  """attention_scores, masked_softmax, masked_logsumexp, weighted_sum, attention_weights."""
  q, k, v = (normal(rng, (B, T, n, h), np.float64) for n, h in ((N, H), (K, H), (K, D)))
  bias = normal(rng, (B, 1, T, T), np.float64)
  logits = normal(rng, (B, N, T, T), np.float64)
  mask = rng.random((B, N, T, T)) > 0.4
  mask[..., 1] = True
  full = mask.copy()
  full[1, 0, 2] = False  # a fully masked row: zero weights (its log-sum-exp is -inf: not checked)
  weights = rng.random((B, N, T, T))
  softmax, logsumexp = jattn.masked_softmax, jattn.masked_logsumexp

  def steps(q, k, bias, scale, logits, weights, v):
    return {
      "scores": jattn.attention_scores(q, k, scale=scale, bias=bias),
      "softmax": (softmax(logits), softmax(logits, mask), softmax(logits, full)),
      "logsumexp": (logsumexp(logits), logsumexp(logits, mask[:1])),  # the mask broadcasts
      "weighted_sum": jattn.weighted_sum(weights, v),
      "weights": [
        jattn.attention_weights(q, k, queries=queries, bias=bias, is_causal=True)
        for queries in (slice(None, None, -1), np.array([3, 0, 0, 2]))  # all T: shapes shared
      ],
    }

  check(steps, q, k, bias, 0.6, logits, weights, v)


def test_masked_softmax_and_logsumexp_gradients_on_a_fully_masked_row(rng, x64):
  logits = normal(rng, (2, 3, 5), np.float64)
  full = rng.random((2, 3, 5)) > 0.4
  full[..., 3] = True
  full[1, 2] = False
  softmax, logsumexp = jattn.masked_softmax, jattn.masked_logsumexp
  jac = np.asarray(jax.jit(jax.jacrev(lambda x: softmax(x, full)))(logits))  # (2, 3, 5, 2, 3, 5)
  assert np.all(np.isfinite(jac))
  assert_array_equal(jac[1, 2], 0.0)  # the fully masked row is constant (all zeros)
  assert_array_equal(jac[..., ~full], 0.0)  # and no weight depends on a masked logit
  assert np.all(np.diagonal(jac.reshape(30, 30))[full.reshape(-1)] > 0)
  # The gradient of the log-sum-exp is the softmax, zero (not NaN) on the fully masked row.
  lse = np.asarray(logsumexp(logits, full))
  assert np.isneginf(lse[1, 2]) and np.sum(np.isfinite(lse)) == 5

  def attended_lse(x):
    return jnp.sum(jnp.where(full.any(-1), logsumexp(x, full), 0.0))

  grad = jax.jit(jax.grad(attended_lse))(logits)
  assert_allclose(grad, softmax(logits, full), rtol=1e-12, atol=1e-15)


def test_attention_stats_gradients(rng, x64):
  """attention_stats has no custom derivative rule, but its log-sum-exp, entropy and largest
  weight have the reverse-mode gradients of the naive ones. (max_weight once lacked the
  gradient of the running maximum, which the online softmax holds constant.)"""
  q, k = normal(rng, (B, T, N, H), np.float64), normal(rng, (B, T, K, H), np.float64)
  mask = rng.random((B, 1, T, T)) > 0.3
  mask[..., 0] = True  # every query attends something: the log-sum-exp is finite

  def blockwise(q, k):
    stats = jattn.attention_stats(q, k, mask=mask, is_causal=True, block_q=2, block_kv=2)
    return stats["lse"], stats["entropy"], stats["max_weight"]

  def naive(q, k):
    weights = jattn.attention_weights(q, k, mask=mask, is_causal=True)
    lse = jattn.masked_logsumexp(
      jattn.attention_scores(q, k), mask & jattn.causal_mask(T)[None, None]
    )
    entropy = -jnp.sum(weights * jnp.log(jnp.where(weights > 0, weights, 1.0)), -1)
    return lse, entropy, jnp.max(weights, axis=-1)

  def grads(fn, q, k):
    return [grads_of(lambda q, k, i=i: fn(q, k)[i], q, k) for i in (0, 1, 2)]

  fast = jax.jit(functools.partial(grads, blockwise))(q, k)
  assert_trees_close(fast, grads(naive, q, k), rtol=1e-9, atol=1e-12)


# --- decode_step -----------------------------------------------------------------------------


def test_decode_step(rng, x64):
  """A fresh cache: decode_step with respect to the params and the inputs."""
  p = random_params(rng)
  x = normal(rng, (B, T, F), np.float64)
  cache = jattn.init_cache(p, (B,), max_len=T)

  def step(p, x):
    out, new = jattn.decode_step(p, cache, x)
    return out, new["key"], new["value"]

  assert_allclose(step(p, x)[0], jattn.self_attention(p, x, is_causal=True), rtol=1e-12)
  check(step, p, x)


def test_gradients_flow_through_the_cache(rng, x64):
  """Two positions, then two more reading the cached ones: the gradients of the second step's
  outputs are those of causal self-attention's last two outputs (checked above)."""
  p = random_params(rng)
  x = normal(rng, (B, T, F), np.float64)

  def decoded(p, x):
    _, cache = jattn.decode_step(p, jattn.init_cache(p, (B,), max_len=T), x[:, :2])
    return jattn.decode_step(p, cache, x[:, 2:])[0]

  grads = jax.jit(functools.partial(grads_of, decoded))(p, x)
  expected = grads_of(lambda p, x: jattn.self_attention(p, x, is_causal=True)[:, 2:], p, x)
  assert_trees_close(grads, expected, rtol=1e-10, atol=1e-13)
  assert np.all(np.any(np.asarray(grads[1])[:, :2] != 0, axis=-1))  # via the cached keys, values


# --- modules ---------------------------------------------------------------------------------


def linen_apply(x, **options):
  """``(p, x) -> the linen module's output with params p``, and the shapes of its params.

  (Shapes only: every test here brings its own params, and drawing them costs compilations.)
  """
  module = jattn.linen.MultiHeadAttention(**options, param_dtype=jnp.float64)
  variables = jax.eval_shape(module.init, jax.random.key(1), x)
  assert set(variables) == {"params"}
  return (lambda p, x: module.apply({"params": p}, x)), jax.tree.map(jnp.shape, variables)["params"]


def nnx_apply(x, **options):
  """``(p, x) -> the nnx module's output with params p`` (pure: split/merge), the shapes of its
  params, and ``holding``: ``p -> a concrete module holding p``."""
  abstract = nnx.eval_shape(
    lambda: jattn.nnx.MultiHeadAttention(
      in_features=x.shape[-1], **options, param_dtype=jnp.float64, rngs=nnx.Rngs(0)
    )
  )
  graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)

  def holding(p):
    fresh = jax.tree.map(lambda a: a, state)  # replace_by_pure_dict writes in place
    nnx.replace_by_pure_dict(fresh, p)
    return nnx.merge(graphdef, fresh, rest)

  shapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(state))
  return (lambda p, x: holding(p)(x)), shapes, holding


def assert_module_is_the_pure_function(apply, p, x, **options):
  """Same outputs and gradients as ``self_attention(p, x, **options)``; non-zero gradients."""
  pure = functools.partial(jattn.self_attention, **options)
  assert_allclose(apply(p, x), pure(p, x), rtol=1e-13, atol=1e-15)
  grads = grads_of(apply, p, x)
  assert_trees_close(grads, grads_of(pure, p, x), rtol=1e-12, atol=1e-14)
  zero = {("key", "bias")}  # a bias on every key shifts all scores alike: gradient 0
  for path, g in jax.tree_util.tree_leaves_with_path(grads[0]):
    assert (tuple(k.key for k in path) in zero) == np.allclose(g, 0.0, atol=1e-12), path
  return grads


def test_linen_module(rng, x64):
  x = normal(rng, (B, T, F), np.float64)
  apply, shapes = linen_apply(x, **MODULE_OPTIONS, is_causal=True)
  assert shapes == PARAM_SHAPES  # the params are the jattn pytree
  p = random_params(rng)
  assert_module_is_the_pure_function(apply, p, x, is_causal=True)
  check(apply, p, x)


def test_nnx_module(rng, x64):
  x = normal(rng, (B, T, F), np.float64)
  apply, shapes, holding = nnx_apply(x, **MODULE_OPTIONS, is_causal=True)
  assert shapes == PARAM_SHAPES
  p = random_params(rng)
  expected = assert_module_is_the_pure_function(apply, p, x, is_causal=True)
  check(apply, p, x)
  # The stateful module holding p: get_params gives p back, and nnx.grad the same gradients.
  module = holding(p)
  assert_trees_close(jattn.nnx.get_params(module), p, rtol=0)
  module_grads = nnx.grad(lambda m: loss(m(x)))(module)
  assert_trees_close(nnx.to_pure_dict(module_grads), expected[0], rtol=1e-12, atol=1e-14)


def test_modules_with_default_and_other_options(rng, x64):
  """By default (Flax's) an out projection to the inputs' features and biases; then no biases;
  then no out projection, a scale and a window: the pure function's gradients in each case."""
  x = normal(rng, (B, T, F), np.float64)
  no_bias = {n: {"kernel": e["kernel"]} for n, e in PARAM_SHAPES.items()}
  no_out = {n: e for n, e in PARAM_SHAPES.items() if n != "out"}
  heads = dict(num_heads=N, head_dim=H, num_kv_heads=K, v_head_dim=D)
  window = dict(scale=0.5, local_window_size=(1, 0))
  for shapes, options, pure_options in (
    (PARAM_SHAPES, heads, {}),
    (no_bias, dict(heads, use_bias=False), {}),
    (no_out, dict(heads, use_out_projection=False, **window), window),
  ):
    p = random_params(rng, shapes)
    for apply, module_shapes, *_ in (linen_apply(x, **options), nnx_apply(x, **options)):
      assert module_shapes == shapes
      assert_module_is_the_pure_function(apply, p, x, **pure_options)


# --- fully masked queries: finite gradients on both paths ------------------------------------


def test_fully_masked_queries_have_finite_gradients(rng):
  """In float32: a query masked out, one whose bias row is -inf, and a batch element with no
  keys at all (key_value_seq_lengths 0)."""
  p = random_params(rng, dtype=np.float32)
  x = normal(rng, (B, T, F))
  mask = np.ones((B, 1, T, T), bool)
  mask[0, :, 1] = False
  bias = np.zeros((B, 1, T, T), np.float32)
  bias[0, :, 2] = -np.inf
  opts = dict(mask=mask, bias=bias, key_value_seq_lengths=np.array([T, 0], np.int32))
  naive = functools.partial(jattn.self_attention, implementation="naive", **opts)
  blockwise = functools.partial(
    jattn.self_attention, implementation="blockwise", block_q=2, block_kv=2, **opts
  )
  out = np.asarray(jax.jit(naive)(p, x))
  assert_allclose(out[0, 1:3], np.broadcast_to(p["out"]["bias"], (2, F)))  # attend nothing
  assert_allclose(out[1], np.broadcast_to(p["out"]["bias"], (T, F)))
  grads = [jax.jit(functools.partial(grads_of, fn))(p, x) for fn in (naive, blockwise)]
  grads = jax.tree.map(np.asarray, grads)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g))
  # The key bias's gradient is zero up to rounding: it shifts all of a query's scores.
  assert_trees_close(*grads, rtol=1e-4, atol=1e-5)
  assert np.all(np.any(grads[0][1][0] != 0, axis=-1))
  assert_array_equal(grads[0][1][1], 0.0)  # batch element 1 only sees the out bias
