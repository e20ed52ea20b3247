"""Flax's own attention tests, ported so they also hold jattn's drop-in modules to them.

Every test takes ``impl``: the module classes come either from Flax (``flax.linen``,
``flax.nnx``) or from jattn (``jattn.linen``, ``jattn.nnx``), so each test first proves itself on
Flax's classes. The ``test_jattn_*`` tests compare jattn's modules with Flax's, given the same
variables, and run only with jattn. Select with ``-k "not jattn"`` (Flax alone) or ``-k jattn``.

Ported from Flax 0.12.8 ``tests/linen/linen_attention_test.py`` (test here):

- ``test_multihead_self_attention``, ``test_multihead_encoder_decoder_attention``,
  ``test_multihead_self_attention_w_dropout``: ``test_linen_output_shape``.
- ``test_dtype_infer``: ``test_linen_dtype_inference`` (real dtypes) and
  ``test_linen_complex_inputs`` (jattn rejects complex inputs with a TypeError, by design).
- ``test_mha_out_initializers``: ``test_linen_out_initializers``, plus
  ``test_initializers_see_flat_matrices`` (initializers get DenseGeneral's flat shapes).
- ``test_multihead_self_attention_explicit_dropout``: ``test_linen_explicit_dropout_rng``.
- ``test_multihead_self_attention_w_dropout_disabled``: ``test_linen_dropout_disabled``.
- Flax's bitwise dropout expectations: ``test_dropout_mask_structure`` checks what dropout does
  (kept weights scaled by 1 / (1 - rate), the rate, one mask shared by batch and heads under
  ``broadcast_dropout``, same rng same mask) by reading the mask off the output.
- ``test_causal_mask_1d``: ``test_linen_flax_masks`` (float masks from ``make_causal_mask`` and
  ``make_attention_mask`` are honoured).
- ``test_decoding``: ``test_linen_decode_matches_causal``.
- ``test_autoregressive_receptive_field_1d``: ``test_linen_receptive_field``.
- ``test_multihead_kv_args``: ``test_linen_kv_arguments``.
- ``test_multihead_sow_attention_weights``: ``test_linen_sow_attention_weights``.
- ``test_autoregressive_decode_with_x64``: ``test_linen_decode_x64`` (plus the cache's names).
- ``test_attention_alias_equivalence``, ``test_attention_alias_submodule``:
  ``test_linen_alias_equivalence``, ``test_linen_alias_submodule_names``.
- ``test_mixed_precision_multihead_attention``: ``test_linen_softmax_dtype``.
- Not a Flax test: ``test_linen_self_attention`` (``SelfAttention`` is MHDPA on one input).

Ported from Flax 0.12.8 ``tests/nnx/nn/attention_test.py``:

- ``test_basic``: ``test_nnx_basic``; ``test_multihead_sow_attention_weights``:
  ``test_nnx_sow_attention_weights``; ``test_autoregressive_decode_with_x64``:
  ``test_nnx_decode_x64``; ``test_keep_rngs``: ``test_nnx_keep_rngs``.
- ``test_causal_mask_equivalence`` (on ``nnx.dot_product_attention``): through the module,
  ``test_nnx_is_causal_matches_explicit_mask``, without Flax's fully masked rows (where jattn
  gives zeros and Flax the mean of the values).
- ``TestLinenConsistency.test_nnx_attention_equivalence``: ``test_nnx_matches_linen`` (four
  cases of Flax's 144-case product, decoding several steps rather than one).
- ``test_varying_num_features``: ``test_nnx_in_kv_features``; ``test_gqa_multihead_attention``:
  ``test_nnx_grouped_query_attention``; ``test_gqa_shapes``, ``test_gqa_parity_with_jax``:
  through the module, ``test_nnx_gqa_equals_repeated_kv_heads``; ``test_gqa_invalid_heads``:
  ``test_nnx_gqa_invalid_heads``; ``TestDotProductAttentionValidation``:
  ``test_nnx_invalid_shapes``.

Left out, as they test Flax internals rather than behaviour: the ``DeprecationWarning`` checks
(``inputs_kv``, ``SelfAttention``, and ``test_multihead_mask_warning``, whose other half expects
Flax's ``ScopeParamShapeError`` from a mask passed as ``inputs_v``);
``test_dot_product_attention_precision_and_einsum_override`` and
``test_dot_product_attention_specify_einsums_together`` (AQT einsum factories of Flax's
functional ``dot_product_attention``; jattn rejects the factories, see
``test_jattn_rejects_unsupported_arguments``); the ``depths must match`` validation case (the
module's projections always give queries and keys one depth). No Flax test exercises a custom
``attention_fn``. Dropout masks are compared by structure, not bits: jattn keys dropout by
position.

jattn against Flax, given the same variables (random, with non-zero biases and LayerNorm scales
away from one), outputs within rtol 1e-5 and gradients within rtol 1e-4:

- ``test_jattn_linen_init_matches_flax``: same rng, same param tree and values, with Flax's
  initializer arguments.
- ``test_jattn_linen_matches_flax``, ``test_jattn_nnx_matches_flax``: several F, N, H (and K),
  self- and cross-attention, float and boolean masks, ``is_causal``, QK LayerNorm, two batch
  dims: same initial params for the same rng, then outputs, sown weights and gradients.
- ``test_jattn_decode_matches_flax``: each decoded step and the final cache.
- ``test_jattn_rejects_unsupported_arguments``: Flax's default accepted, anything else an error
  naming the argument.
"""

import dataclasses
import importlib
import inspect
import re
import warnings
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

RTOL, ATOL = 1e-5, 1e-6  # jattn's outputs against Flax's, float32


@dataclasses.dataclass(frozen=True)
class Impl:
  """Where the module classes come from: ``linen.MultiHeadDotProductAttention``, ...."""

  name: str
  linen: ModuleType
  nnx: ModuleType


def load(name: str) -> Impl:
  if name == "flax":
    return Impl("flax", nn, nnx)
  return Impl("jattn", importlib.import_module("jattn.linen"), importlib.import_module("jattn.nnx"))


@pytest.fixture(params=["flax", "jattn"])
def impl(request) -> Impl:
  return load(request.param)


def key(seed: int) -> jax.Array:
  return jax.random.key(seed)


def normal(seed: int, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """Random inputs from NumPy: no XLA compilation per shape, as jax.random would need."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def uniform(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape).astype(np.float32))


def perturb(tree: Any, seed: int, scale: float = 0.5) -> Any:
  """``tree`` plus noise: biases become non-zero and LayerNorm scales move away from one."""
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  noisy = [
    jnp.asarray((np.asarray(x, np.float64) + scale * rng.standard_normal(x.shape)).astype(x.dtype))
    for x in leaves
  ]
  return jax.tree.unflatten(treedef, noisy)


def assert_trees_close(actual: Any, expected: Any, rtol: float = RTOL, atol: float = ATOL):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, a.dtype, e.shape, e.dtype)
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol, atol)


def assert_trees_equal(actual: Any, expected: Any):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(a, e)


def params_of(module: nnx.Module) -> dict:
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def set_params(module: nnx.Module, params: dict) -> None:
  """Loads a pure dict of params (an nnx module's or a linen module's) into ``module``."""
  state = nnx.state(module, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(module, state)


def tile_eye(rng, shape, dtype=jnp.float32):
  """Initializes a flat ``(rows, cols)`` matrix as ``cols // rows`` identities side by side."""
  del rng
  rows, cols = shape
  return jnp.tile(jnp.eye(rows, dtype=dtype), (1, cols // rows))


def mhdpa_kwargs(**overrides) -> dict:
  """The options most of Flax's linen tests use."""
  return (
    dict(
      num_heads=8,
      qkv_features=16,
      kernel_init=jax.nn.initializers.ones,
      bias_init=jax.nn.initializers.zeros,
      deterministic=False,
    )
    | overrides
  )


# --- linen: tests/linen/linen_attention_test.py -------------------------------------------------


@pytest.mark.parametrize(
  "shape, dropout_rate", [((4, 6, 5), 0.0), ((4, 2, 3, 5), 0.1)], ids=["3d", "4d-dropout"]
)
def test_linen_output_shape(impl, shape, dropout_rate):
  module = impl.linen.MultiHeadDotProductAttention(**mhdpa_kwargs(dropout_rate=dropout_rate))
  x = jnp.ones(shape)
  y, _ = module.init_with_output({"params": key(0), "dropout": key(1)}, x)
  assert y.shape == x.shape
  assert y.dtype == jnp.float32


@pytest.mark.parametrize(
  "x_dtype, dtype, expected",
  [
    (jnp.bfloat16, None, jnp.float32),  # inferred: bfloat16 inputs promoted with float32 params
    (jnp.float32, jnp.bfloat16, jnp.bfloat16),  # dtype= is the computation dtype
  ],
  ids=["inferred", "given"],
)
def test_linen_dtype_inference(impl, x_dtype, dtype, expected):
  module = impl.linen.MultiHeadDotProductAttention(
    **mhdpa_kwargs(dtype=dtype, kernel_init=nn.initializers.lecun_normal())
  )
  x = normal(0, (4, 6, 5), x_dtype)
  y, variables = module.init_with_output(key(1), x)
  assert y.shape == x.shape
  assert y.dtype == expected
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_linen_complex_inputs(impl):
  module = impl.linen.MultiHeadDotProductAttention(**mhdpa_kwargs())
  x = jnp.ones((4, 6, 5), jnp.complex64)
  if impl.name == "jattn":  # jattn's documented choice: complex inputs are a TypeError
    with pytest.raises(TypeError, match="complex64"):
      module.init(key(0), x)
    return
  y, _ = module.init_with_output(key(0), x)
  assert y.shape == x.shape
  assert y.dtype == jnp.complex64


def test_linen_out_initializers(impl):
  module = impl.linen.MultiHeadDotProductAttention(
    **mhdpa_kwargs(
      out_kernel_init=jax.nn.initializers.zeros, out_bias_init=jax.nn.initializers.ones
    )
  )
  params = module.init(key(0), jnp.ones((4, 2, 3, 5)))["params"]
  assert jax.tree.map(jnp.shape, params) == {
    "query": {"kernel": (5, 8, 2), "bias": (8, 2)},
    "key": {"kernel": (5, 8, 2), "bias": (8, 2)},
    "value": {"kernel": (5, 8, 2), "bias": (8, 2)},
    "out": {"kernel": (8, 2, 5), "bias": (5,)},
  }
  for name in ("query", "key", "value"):
    np.testing.assert_array_equal(params[name]["kernel"], 1.0)
    np.testing.assert_array_equal(params[name]["bias"], 0.0)
  np.testing.assert_array_equal(params["out"]["kernel"], 0.0)
  np.testing.assert_array_equal(params["out"]["bias"], 1.0)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_initializers_see_flat_matrices(impl, api):
  """As Flax's DenseGeneral: kernels are initialized as (in, N*H) and (N*H, out) matrices."""
  calls = []

  def recording(name, init):
    def wrapped(rng, shape, dtype=jnp.float32):
      calls.append((name, tuple(shape)))
      return init(rng, shape, dtype)

    return wrapped

  inits = dict(
    kernel_init=recording("kernel", nn.initializers.lecun_normal()),
    out_kernel_init=recording("out_kernel", nn.initializers.lecun_normal()),
    bias_init=recording("bias", nn.initializers.zeros),
    out_bias_init=recording("out_bias", nn.initializers.zeros),
  )
  x = jnp.ones((2, 3, 5))
  if api == "linen":
    module = impl.linen.MultiHeadDotProductAttention(
      num_heads=2, qkv_features=6, out_features=7, **inits
    )
    module.init(key(0), x)
  else:
    impl.nnx.MultiHeadAttention(
      num_heads=2, in_features=5, qkv_features=6, out_features=7, rngs=nnx.Rngs(0), **inits
    )
  assert sorted(calls) == sorted(
    [("kernel", (5, 6))] * 3 + [("bias", (6,))] * 3 + [("out_kernel", (6, 7)), ("out_bias", (7,))]
  )


def explicit_dropout_model(attention_cls):
  class Twice(nn.Module):
    """Two attention layers on one input, both given ``dropout_rng`` when it is passed."""

    @nn.compact
    def __call__(self, x, dropout_rng=None):
      kwargs = mhdpa_kwargs(dropout_rate=0.5)
      a = attention_cls(**kwargs)(x, x, dropout_rng=dropout_rng)
      b = attention_cls(**kwargs)(x, x, dropout_rng=dropout_rng)
      return a, b

  return Twice()


def test_linen_explicit_dropout_rng(impl):
  model = explicit_dropout_model(impl.linen.MultiHeadDotProductAttention)
  x = normal(0, (4, 2, 3, 5))
  variables = model.init({"params": key(1), "dropout": key(2)}, x)
  a, b = model.apply(variables, x, rngs={"dropout": key(2)})
  c, d = model.apply(variables, x, rngs={"dropout": key(2)})
  e, f = model.apply(variables, x, rngs={"dropout": key(3)})
  # The two layers have equal params (ones and zeros): only their dropout masks differ.
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(a, c)  # same rng, same output
  np.testing.assert_array_equal(b, d)
  assert not np.array_equal(a, e)  # another rng, another output
  assert not np.array_equal(b, f)
  # An explicit dropout_rng gives both layers one mask, whatever the "dropout" stream.
  a, b = model.apply(variables, x, rngs={"dropout": key(2)}, dropout_rng=key(4))
  np.testing.assert_array_equal(a, b)
  a2, b2 = model.apply(variables, x, dropout_rng=key(4))
  np.testing.assert_array_equal(a2, b2)
  np.testing.assert_array_equal(a2, a)
  assert a.shape == b.shape == x.shape


def test_linen_dropout_disabled(impl):
  cls = impl.linen.MultiHeadDotProductAttention
  x = normal(0, (4, 2, 3, 5))
  rngs1 = {"params": key(1), "dropout": key(2)}
  rngs2 = {"params": key(3), "dropout": key(4)}
  no_dropout = cls(**mhdpa_kwargs(dropout_rate=0.0, deterministic=True))
  y1, variables = no_dropout.init_with_output(rngs1, x)
  y2, _ = no_dropout.init_with_output(rngs2, x)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(no_dropout.apply(variables, x, rngs=rngs1), y1)
  np.testing.assert_array_equal(no_dropout.apply(variables, x, rngs=rngs2), y1)
  # deterministic given at call time, rate zero or not: no dropout, whatever the rngs.
  for rate in (0.0, 0.5):
    module = cls(**mhdpa_kwargs(dropout_rate=rate, deterministic=None))
    for rngs in (rngs1, rngs2):
      y = module.apply(variables, x, deterministic=True, rngs=rngs)
      np.testing.assert_allclose(y, y1, RTOL, ATOL)
  dropped = cls(**mhdpa_kwargs(dropout_rate=0.5, deterministic=None))
  assert not np.allclose(dropped.apply(variables, x, deterministic=False, rngs=rngs1), y1)


def dropout_masks(impl, api, *, rate, broadcast, seeds, B=4, N=4, S=16):
  """The (B, N, T, S) keep masks, times 1 / (1 - rate), of calls with dropout rngs ``seeds``.

  Each is read off the output: queries are zero (uniform weights 1/S), key/value inputs are
  one-hot positions and the projections copy them into every head, so output feature
  ``n * S + s`` of query ``t`` is the dropped-out weight of key ``s`` in head ``n``.
  """
  options = dict(
    num_heads=N,
    qkv_features=N * S,
    out_features=N * S,
    use_bias=False,
    kernel_init=tile_eye,
    broadcast_dropout=broadcast,
    dropout_rate=rate,
  )
  inputs_q = jnp.zeros((B, S, S))
  inputs_kv = jnp.broadcast_to(jnp.eye(S), (B, S, S))
  if api == "linen":
    module = impl.linen.MultiHeadDotProductAttention(**options)
    variables = module.init(key(0), inputs_q, inputs_kv, deterministic=True)

    @jax.jit
    def run(rng):
      return module.apply(
        variables, inputs_q, inputs_kv, deterministic=False, rngs={"dropout": rng}
      )

    outputs = [run(key(seed)) for seed in seeds]
  else:
    module = impl.nnx.MultiHeadAttention(in_features=S, decode=False, rngs=nnx.Rngs(0), **options)
    outputs = [
      module(inputs_q, inputs_kv, deterministic=False, rngs=nnx.Rngs(dropout=seed))
      for seed in seeds
    ]
  return [np.asarray(y).reshape(B, S, N, S).transpose(0, 2, 1, 3) * S for y in outputs]


@pytest.mark.parametrize("broadcast", [True, False], ids=["broadcast", "per-element"])
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_dropout_mask_structure(impl, api, broadcast):
  rate = 0.25
  scaled, again, other = dropout_masks(impl, api, rate=rate, broadcast=broadcast, seeds=(1, 1, 2))
  keep = np.round(scaled * (1 - rate))
  np.testing.assert_allclose(scaled, keep / (1 - rate), rtol=1e-5, atol=1e-5)  # kept: 1/(1-rate)
  assert set(np.unique(keep)) == {0.0, 1.0}
  if broadcast:  # one (T, S) mask for every batch element and head
    np.testing.assert_array_equal(keep, np.broadcast_to(keep[:1, :1], keep.shape))
    assert abs(keep[0, 0].mean() - (1 - rate)) < 0.1  # 256 draws: 3.7 sigma
  else:
    assert not np.array_equal(keep[0], keep[1])  # batch elements differ
    assert not np.array_equal(keep[:, 0], keep[:, 1])  # heads differ
    assert abs(keep.mean() - (1 - rate)) < 0.03  # 4096 draws: 4.4 sigma
  np.testing.assert_array_equal(again, scaled)  # same rng, same mask
  assert not np.array_equal(other, scaled)


def test_linen_flax_masks(impl):
  module = impl.linen.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  apply = jax.jit(module.apply)
  B, T, F = 2, 6, 4
  x = normal(0, (B, T, F))
  variables = perturb(module.init(key(1), x), 2)
  causal = nn.make_causal_mask(jnp.ones((B, T)))  # float32, (B, 1, T, T)
  assert causal.dtype == jnp.float32
  y = apply(variables, x, mask=causal)
  tril = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, 1, T, T))
  np.testing.assert_allclose(apply(variables, x, mask=tril), y, RTOL, ATOL)
  t = 3  # a prefix alone gives the same outputs
  prefix = apply(variables, x[:, : t + 1], mask=causal[..., : t + 1, : t + 1])
  np.testing.assert_allclose(prefix, y[:, : t + 1], RTOL, ATOL)
  # Padding: keys at padded positions do not matter.
  valid = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], np.float32)
  padding = nn.make_attention_mask(jnp.ones((B, T)), jnp.asarray(valid))  # float32, (B, 1, T, T)
  kv = normal(3, (B, T, F))
  changed = kv + jnp.asarray((1 - valid)[..., None]) * normal(4, (B, T, F))
  y = apply(variables, x, kv, mask=padding)
  np.testing.assert_allclose(apply(variables, x, changed, mask=padding), y, RTOL, ATOL)
  unmasked = np.ones((B, 1, T, T), bool)
  assert not np.allclose(apply(variables, x, changed, mask=unmasked), y)


@pytest.mark.parametrize("spatial_shape", [(5,), (6, 5)], ids=["batch", "two-batch-dims"])
def test_linen_decode_matches_causal(impl, spatial_shape):
  B, N, H = 2, 3, 4
  inputs = normal(0, (B, *spatial_shape, N * H))
  module = impl.linen.MultiHeadDotProductAttention(
    num_heads=N, qkv_features=N * H, precision=lax.Precision.HIGHEST, deterministic=False
  )
  decoder = module.clone(decode=True)
  variables = decoder.init(key(1), inputs)
  params, cache = variables["params"], variables["cache"]
  causal = nn.make_causal_mask(jnp.ones((B, *spatial_shape)))
  expected = module.apply({"params": params}, inputs, mask=causal)

  @jax.jit
  def step(cache, x):
    y, updates = decoder.apply({"params": params, "cache": cache}, x, mutable=["cache"])
    return updates["cache"], y

  outputs = []
  for i in range(spatial_shape[-1]):
    cache, y = step(cache, inputs[..., i : i + 1, :])
    outputs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=-2), expected, atol=1e-5)


def test_linen_receptive_field(impl):
  """Output t depends on every input s <= t and on no later one, exactly."""
  L, F = 8, 4
  module = impl.linen.MultiHeadDotProductAttention(num_heads=2, deterministic=False)
  x = normal(0, (1, L, F))
  variables = perturb(module.init(key(1), x), 2)
  causal = nn.make_causal_mask(jnp.ones((1, L)))
  jacobian = jax.jit(jax.jacobian(lambda x: module.apply(variables, x, mask=causal)[0]))(x)
  dependence = np.abs(np.asarray(jacobian)[:, :, 0]).max(axis=(1, 3))  # (t, s)
  past = np.tril(np.ones((L, L), bool))
  np.testing.assert_array_equal(dependence[~past], 0.0)
  assert (dependence[past] > 1e-6).all()


def test_linen_kv_arguments(impl):
  query = uniform(1, (3, 5))
  key_value = uniform(2, (9, 5))
  module = impl.linen.MultiHeadDotProductAttention(**mhdpa_kwargs())
  y0, v0 = module.init_with_output(key(3), query, inputs_k=key_value, inputs_v=key_value)
  y1, v1 = module.init_with_output(key(3), query, inputs_k=key_value)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # Flax: inputs_kv will be deprecated
    y2, v2 = module.init_with_output(key(3), query, inputs_kv=key_value)
  np.testing.assert_array_equal(y0, y1)
  np.testing.assert_array_equal(y1, y2)
  assert_trees_equal(v0, v1)
  assert_trees_equal(v1, v2)
  with pytest.raises(ValueError, match="inputs_k"):
    module.init_with_output(key(3), query, inputs_v=key_value)
  with pytest.raises(ValueError, match="inputs_kv"):
    module.init_with_output(key(3), query, inputs_kv=key_value, inputs_v=key_value)
  with pytest.raises(ValueError, match="inputs_kv"):
    module.init_with_output(key(3), query, key_value, key_value, inputs_kv=key_value)


def test_linen_sow_attention_weights(impl):
  cls = impl.linen.MultiHeadDotProductAttention

  class Three(nn.Module):
    @nn.compact
    def __call__(self, x, sow_weights=False):
      x = cls(**mhdpa_kwargs())(x, sow_weights=sow_weights)
      x = cls(**mhdpa_kwargs())(x)
      return cls(**mhdpa_kwargs())(x, sow_weights=sow_weights)

  model = Three()
  x = normal(0, (4, 6, 5))
  variables = model.init(key(1), x)
  _, state = model.apply(variables, x, mutable=["intermediates"], sow_weights=True)
  intermediates = state["intermediates"]
  assert set(intermediates) == {
    "MultiHeadDotProductAttention_0",
    "MultiHeadDotProductAttention_2",
  }
  for name in intermediates:
    (weights,) = intermediates[name]["attention_weights"]
    assert weights.shape == (4, 8, 6, 6)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  _, state = model.apply(variables, x, mutable=["intermediates"], sow_weights=False)
  assert "intermediates" not in state


def test_linen_decode_x64(impl):
  with jax.enable_x64(True):
    x = jnp.ones((1, 4, 6))  # not (1, 4, 4): Flax warns of a square inputs_v (a mask?)
    module = impl.linen.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, decode=True)
    variables = module.init(key(0), x, x, x)
    params, cache = variables["params"], variables["cache"]
    assert jax.tree.map(jnp.shape, cache) == {
      "cached_key": (1, 4, 2, 2),
      "cached_value": (1, 4, 2, 2),
      "cache_index": (),
    }
    for i in range(2):
      y, updates = module.apply(
        {"params": params, "cache": cache}, x[:, i : i + 1], mutable=["cache"]
      )
      cache = updates["cache"]
      assert y.shape == (1, 1, 6)
      assert int(cache["cache_index"]) == i + 1


ALIAS_KWARGS = dict(
  num_heads=8,
  qkv_features=16,
  kernel_init=nn.initializers.lecun_normal(),
  bias_init=nn.initializers.uniform(),
  deterministic=False,
)


def test_linen_alias_equivalence(impl):
  query = uniform(1, (3, 5))
  key_value = uniform(2, (9, 5))
  mhdpa = impl.linen.MultiHeadDotProductAttention(**ALIAS_KWARGS)
  mha = impl.linen.MultiHeadAttention(**ALIAS_KWARGS)
  out1, v1 = mhdpa.init_with_output(key(3), query, key_value)
  out2, v2 = mha.init_with_output(key(3), query, key_value, key_value)
  np.testing.assert_array_equal(out1, out2)
  assert_trees_equal(v1, v2)


def test_linen_alias_submodule_names(impl):
  """Inside a parent, the alias is named after its class: other name, other rngs, other params."""
  query = uniform(1, (3, 5))
  key_value = uniform(2, (9, 5))
  mhdpa_cls, mha_cls = impl.linen.MultiHeadDotProductAttention, impl.linen.MultiHeadAttention

  class WithMHDPA(nn.Module):
    @nn.compact
    def __call__(self, q, kv):
      return mhdpa_cls(**ALIAS_KWARGS)(q, kv)

  class WithMHA(nn.Module):
    name_override: str | None = None

    @nn.compact
    def __call__(self, q, k, v):
      return mha_cls(**ALIAS_KWARGS, name=self.name_override)(q, k, v)

  out1, v1 = WithMHDPA().init_with_output(key(4), query, key_value)
  out2, v2 = WithMHA().init_with_output(key(4), query, key_value, key_value)
  assert set(v1["params"]) == {"MultiHeadDotProductAttention_0"}
  assert set(v2["params"]) == {"MultiHeadAttention_0"}
  assert not np.allclose(out1, out2)
  for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v2), strict=True):
    assert not np.allclose(a, b)
  # The same variables under the alias's name: the same output.
  renamed = {"params": {"MultiHeadAttention_0": v1["params"]["MultiHeadDotProductAttention_0"]}}
  np.testing.assert_array_equal(WithMHA().apply(renamed, query, key_value, key_value), out1)
  # The same name: the same variables and output.
  named = WithMHA(name_override="MultiHeadDotProductAttention_0")
  out3, v3 = named.init_with_output(key(4), query, key_value, key_value)
  np.testing.assert_array_equal(out3, out1)
  assert_trees_equal(v3, v1)


@pytest.mark.parametrize(
  "force_fp32, weights_dtype", [(True, jnp.float32), (False, jnp.bfloat16)], ids=["fp32", "bf16"]
)
def test_linen_softmax_dtype(impl, force_fp32, weights_dtype):
  x = uniform(1, (2, 4))
  module = impl.linen.MultiHeadDotProductAttention(
    **ALIAS_KWARGS | dict(num_heads=2, qkv_features=4),
    force_fp32_for_softmax=force_fp32,
    dtype=jnp.bfloat16,
  )
  variables = module.init({"params": key(2), "dropout": key(3)}, x)
  y, state = module.apply(variables, x, mutable=["intermediates"], sow_weights=True)
  (weights,) = state["intermediates"]["attention_weights"]
  # jattn computes every softmax in float32 and sows the weights in the computation dtype,
  # with or without the flag (README "Switching from Flax").
  assert weights.dtype == (jnp.bfloat16 if impl.name == "jattn" else weights_dtype)
  assert y.dtype == jnp.bfloat16


def test_linen_self_attention(impl):
  x = normal(0, (2, 5, 6))
  causal = nn.make_causal_mask(jnp.ones((2, 5)))
  options = dict(num_heads=2, qkv_features=8, bias_init=nn.initializers.uniform())
  self_attention = impl.linen.SelfAttention(**options)
  mhdpa = impl.linen.MultiHeadDotProductAttention(**options)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # Flax: SelfAttention will be deprecated
    variables = self_attention.init(key(1), x)
    y = self_attention.apply(variables, x, mask=causal)
  assert_trees_equal(variables, mhdpa.init(key(1), x))
  np.testing.assert_array_equal(y, mhdpa.apply(variables, x, mask=causal))


# --- nnx: tests/nnx/nn/attention_test.py ---------------------------------------------------------


def test_nnx_basic(impl):
  module = impl.nnx.MultiHeadAttention(
    num_heads=2, in_features=3, qkv_features=6, out_features=6, rngs=nnx.Rngs(0)
  )
  assert module(jnp.ones((1, 7, 3)), decode=False).shape == (1, 7, 6)


def test_nnx_sow_attention_weights(impl):
  class Three(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List(
        [
          impl.nnx.MultiHeadAttention(
            in_features=8,
            num_heads=8,
            kernel_init=nnx.initializers.ones_init(),
            bias_init=nnx.initializers.zeros_init(),
            deterministic=False,
            decode=False,
            rngs=rngs,
          )
          for _ in range(3)
        ]
      )

    def __call__(self, x, sow_weights=False):
      x = self.layers[0](x, sow_weights=sow_weights)
      x = self.layers[1](x)
      return self.layers[2](x, sow_weights=sow_weights)

  model = Three(nnx.Rngs(0))
  x = normal(0, (4, 6, 8))
  _, intermediates = nnx.capture(model, nnx.Intermediate)(x, True)
  intermediates = nnx.to_pure_dict(intermediates)
  assert set(intermediates["layers"]) == {0, 2}
  for i in (0, 2):
    (weights,) = intermediates["layers"][i]["attention_weights"]
    assert weights.shape == (4, 8, 6, 6)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  _, intermediates = nnx.capture(model, nnx.Intermediate)(x)
  assert not intermediates


def test_nnx_decode_x64(impl):
  with jax.enable_x64(True):
    x = jnp.ones((1, 4, 4))
    module = impl.nnx.MultiHeadAttention(
      in_features=4, num_heads=2, qkv_features=4, decode=True, rngs=nnx.Rngs(0)
    )
    module.init_cache(x.shape, dtype=x.dtype)
    assert module.cached_key.shape == (1, 4, 2, 2)
    assert module.cached_value.shape == (1, 4, 2, 2)
    for i in range(2):
      assert module(x[:, i : i + 1]).shape == (1, 1, 4)
      assert int(module.cache_index[...]) == i + 1


@pytest.mark.parametrize("keep_rngs", [True, False])
def test_nnx_keep_rngs(impl, keep_rngs):
  module = impl.nnx.MultiHeadAttention(
    in_features=4,
    num_heads=2,
    qkv_features=4,
    decode=False,
    dropout_rate=0.5,
    keep_rngs=keep_rngs,
    rngs=nnx.Rngs(42),
  )
  x = normal(0, (1, 3, 4))
  if keep_rngs:
    _, _, rest = nnx.split(module, nnx.Param, ...)
    kinds = {type(v) for v in jax.tree.leaves(rest, is_leaf=lambda v: isinstance(v, nnx.Variable))}
    assert kinds == {nnx.RngCount, nnx.RngKey}
    assert not np.array_equal(module(x, deterministic=False), module(x, deterministic=False))
  else:
    nnx.split(module, nnx.Param)  # nothing but params
    with pytest.raises(ValueError, match="rngs"):
      module(x, deterministic=False)
  y = module(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
  np.testing.assert_array_equal(module(x, deterministic=False, rngs=nnx.Rngs(dropout=1)), y)


@pytest.mark.parametrize(
  "cross, padding", [(True, True), (False, False)], ids=["cross-pad", "self"]
)
def test_nnx_is_causal_matches_explicit_mask(impl, cross, padding):
  """is_causal=True is Flax's (T, S) lower-triangular mask, aligned top left."""
  B, T, F, N = 2, 3, 4, 2
  S = 5 if cross else T
  module = impl.nnx.MultiHeadAttention(
    num_heads=N, in_features=F, qkv_features=8, decode=False, rngs=nnx.Rngs(0)
  )
  q, kv = normal(1, (B, T, F)), normal(2, (B, S, F))
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, S), bool)), (B, N, T, S))
  mask = None
  if padding:  # the last key is padding; no query row is left without keys
    mask = jnp.broadcast_to(jnp.arange(S) < S - 1, (B, 1, T, S))
  explicit = module(q, kv, mask=nnx.combine_masks(mask, causal))
  np.testing.assert_allclose(module(q, kv, mask=mask, is_causal=True), explicit, RTOL, ATOL)


NNX_LINEN_CASES = [  # (use_bias, dtype, param_dtype, precision, decode, normalize_qk)
  (False, jnp.float32, jnp.float32, lax.Precision.HIGHEST, True, True),
  (True, jnp.float16, jnp.float32, lax.Precision.HIGH, False, True),
  (True, jnp.float32, jnp.float16, lax.Precision.HIGHEST, True, False),
  (False, jnp.float16, jnp.float16, lax.Precision.DEFAULT, True, False),
]


@pytest.mark.parametrize("case", NNX_LINEN_CASES, ids=range(len(NNX_LINEN_CASES)))
def test_nnx_matches_linen(impl, case):
  """One implementation's nnx and linen modules agree given the same variables."""
  use_bias, dtype, param_dtype, precision, decode, normalize_qk = case
  N, F, QKV, O = 2, 3, 6, 6
  options = dict(
    num_heads=N,
    qkv_features=QKV,
    out_features=O,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    precision=precision,
    decode=decode,
    normalize_qk=normalize_qk,
  )
  x = normal(0, (2, 4, F))
  linen_module = impl.linen.MultiHeadDotProductAttention(**options)
  nnx_module = impl.nnx.MultiHeadAttention(in_features=F, rngs=nnx.Rngs(42), **options)
  variables = jax.jit(linen_module.init)(key(42), x)
  params = perturb(variables["params"], 1, scale=0.2)
  set_params(nnx_module, params)
  tolerance = dict(rtol=RTOL, atol=ATOL) if dtype == jnp.float32 else dict(rtol=2e-3, atol=2e-3)
  if not decode:
    expected = jax.jit(linen_module.apply)({"params": params}, x)
    np.testing.assert_allclose(nnx_module(x), expected, **tolerance)
    return

  @jax.jit
  def step(cache, token):
    y, updates = linen_module.apply({"params": params, "cache": cache}, token, mutable=["cache"])
    return updates["cache"], y

  nnx_module.init_cache(x.shape, dtype=dtype)
  cache = variables["cache"]
  for i in range(x.shape[-2]):
    token = x[:, i : i + 1]
    cache, expected = step(cache, token)
    np.testing.assert_allclose(nnx_module(token), expected, **tolerance)


def test_nnx_in_kv_features(impl):
  layer = impl.nnx.MultiHeadAttention(
    num_heads=2,
    in_features=3,
    qkv_features=6,
    out_features=6,
    in_kv_features=4,
    decode=False,
    rngs=nnx.Rngs(42),
  )
  assert layer.key.kernel.shape == layer.value.kernel.shape == (4, 2, 3)
  assert layer(jnp.ones((1, 3)), normal(0, (1, 4))).shape == (1, 6)
  assert layer(jnp.ones((2, 5, 3)), normal(0, (2, 7, 4))).shape == (2, 5, 6)


def test_nnx_grouped_query_attention(impl):
  F, N, K, QKV = 8, 4, 2, 16
  H = QKV // N
  model = impl.nnx.MultiHeadAttention(
    num_heads=N, in_features=F, qkv_features=QKV, num_kv_heads=K, rngs=nnx.Rngs(0)
  )
  assert model.query.kernel.shape == (F, N, H)
  assert model.key.kernel.shape == (F, K, H)
  assert model.value.kernel.shape == (F, K, H)
  assert model(jnp.ones((1, 6, F)), decode=False).shape == (1, 6, F)
  model.init_cache((1, 6, F))
  assert model.cached_key.shape == model.cached_value.shape == (1, 6, K, H)
  assert model(jnp.ones((1, 1, F)), decode=True).shape == (1, 1, F)
  assert int(model.cache_index[...]) == 1


def test_nnx_gqa_equals_repeated_kv_heads(impl):
  """Query head n uses key/value head n // (N // K), as in jax.nn.dot_product_attention."""
  F, N, K, H = 6, 4, 2, 3
  options = dict(in_features=F, qkv_features=N * H, decode=False)
  gqa = impl.nnx.MultiHeadAttention(num_heads=N, num_kv_heads=K, rngs=nnx.Rngs(0), **options)
  mha = impl.nnx.MultiHeadAttention(num_heads=N, rngs=nnx.Rngs(1), **options)
  params = perturb(params_of(gqa), 2)
  set_params(gqa, params)
  repeated = jax.tree.map(lambda p: p, params)
  for name in ("key", "value"):
    repeated[name]["kernel"] = jnp.repeat(params[name]["kernel"], N // K, axis=1)
    repeated[name]["bias"] = jnp.repeat(params[name]["bias"], N // K, axis=0)
  set_params(mha, repeated)
  q, kv = normal(3, (2, 5, F)), normal(4, (2, 7, F))
  np.testing.assert_allclose(gqa(q, kv), mha(q, kv), RTOL, ATOL)


def test_nnx_gqa_invalid_heads(impl):
  with pytest.raises(ValueError, match="num_kv_heads"):
    impl.nnx.MultiHeadAttention(num_heads=5, num_kv_heads=2, in_features=4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
  "q_shape, k_shape, v_shape, flax_message",
  [
    ((2, 6, 4), (6, 4), (6, 4), "q, k, v must have same rank"),
    ((2, 6, 4), (3, 6, 4), (3, 6, 4), "q, k, v batch dims must match"),
    ((2, 6, 4), (2, 6, 4), (2, 5, 4), "k, v lengths must match, but got 6 and 5"),
  ],
  ids=["rank", "batch", "kv-length"],
)
def test_nnx_invalid_shapes(impl, q_shape, k_shape, v_shape, flax_message):
  module = impl.nnx.MultiHeadAttention(
    num_heads=2,
    in_features=4,
    dropout_rate=0.1,
    deterministic=False,
    decode=False,
    rngs=nnx.Rngs(0),
  )
  # Flax says which rule broke; jattn checks the inputs before projecting and names all three.
  jattn_message = re.escape(
    f"x_q {q_shape} and x_k {k_shape} and x_v {v_shape} must have the same leading batch "
    "dimensions (and keys and values the same length)"
  )
  with pytest.raises(ValueError, match=flax_message if impl.name == "flax" else jattn_message):
    module(jnp.ones(q_shape), jnp.ones(k_shape), jnp.ones(v_shape))


def test_nnx_value_without_key(impl):
  module = impl.nnx.MultiHeadAttention(num_heads=2, in_features=4, decode=False, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="inputs_k"):
    module(jnp.ones((2, 3, 4)), inputs_v=jnp.ones((2, 3, 4)))


# --- jattn against Flax, with the same variables -------------------------------------------------


LINEN_PARITY_CASES = {
  # F=8, N=2, H=4: self-attention, no mask.
  "F8-N2-H4": dict(options=dict(num_heads=2, qkv_features=8), q=(2, 5, 8)),
  # F=6, N=3, H=2: cross-attention, separate keys and values, float padding mask.
  "F6-N3-H2-cross": dict(
    options=dict(num_heads=3, qkv_features=6, out_features=5), q=(2, 4, 6), kv=(2, 7, 6), pad=True
  ),
  # F=5, N=1, H=3: float causal mask, QK LayerNorm, highest precision.
  "F5-N1-H3-causal-ln": dict(
    options=dict(num_heads=1, qkv_features=3, normalize_qk=True, precision="highest"),
    q=(2, 6, 5),
    causal=True,
  ),
  # F=4, N=4, H=3: two batch dims, boolean causal mask broadcast over them.
  "F4-N4-H3-batch2": dict(options=dict(num_heads=4, qkv_features=12), q=(2, 3, 5, 4), causal=True),
}


def padding_mask(q_shape, kv_shape):
  """A float mask from ``make_attention_mask``: each batch element keeps a prefix of the keys.

  Every prefix holds the first key, so no query row is fully masked (there jattn gives zeros and
  Flax the mean of the values).
  """
  S = kv_shape[-2]
  lengths = np.random.default_rng(S).integers(1, S + 1, size=kv_shape[:-2])
  lengths.flat[0] = S - 2
  valid = (np.arange(S) < lengths[..., None]).astype(np.float32)
  return nn.make_attention_mask(jnp.ones(q_shape[:-1]), jnp.asarray(valid))


def linen_module_output_shape(case):
  return (*case["q"][:-1], case["options"].get("out_features", case["q"][-1]))


def parity_inputs(case):
  """``(q, kv, v, mask)`` of a parity case: a padding mask with ``"pad"``, Flax's causal mask
  (from ``make_causal_mask``) with ``"causal"``."""
  q = normal(10, case["q"])
  kv = normal(11, case["kv"]) if "kv" in case else None
  v = normal(12, case["kv"]) if "kv" in case else None
  mask = None
  if case.get("pad"):
    mask = padding_mask(case["q"], case["kv"])
  if case.get("causal"):
    mask = nn.make_causal_mask(jnp.ones(case["q"][:-1]))
    if len(case["q"]) > 3:
      mask = mask.astype(bool)
  return q, kv, v, mask


@pytest.mark.parametrize(
  "options",
  [
    dict(num_heads=3, qkv_features=6, out_features=4, use_bias=False, normalize_qk=True),
    dict(
      num_heads=1,
      kernel_init=nn.initializers.normal(0.5),
      bias_init=nn.initializers.uniform(),
      out_kernel_init=nn.initializers.orthogonal(),
      out_bias_init=nn.initializers.normal(1.0),
    ),
  ],
  ids=["no-bias-ln", "initializers"],
)
def test_jattn_linen_init_matches_flax(options):
  x, kv = normal(0, (2, 5, 6)), normal(1, (2, 7, 3))
  expected = jax.jit(nn.MultiHeadDotProductAttention(**options).init)(key(2), x, kv)
  actual = jax.jit(load("jattn").linen.MultiHeadDotProductAttention(**options).init)(key(2), x, kv)
  assert jax.tree.map(jnp.shape, actual) == jax.tree.map(jnp.shape, expected)
  assert_trees_equal(actual, expected)  # bit for bit, as the README says


@pytest.mark.parametrize("case", list(LINEN_PARITY_CASES))
def test_jattn_linen_matches_flax(case):
  case = LINEN_PARITY_CASES[case]
  flax_module = nn.MultiHeadDotProductAttention(**case["options"])
  jattn_module = load("jattn").linen.MultiHeadDotProductAttention(**case["options"])
  q, kv, v, mask = parity_inputs(case)
  initial = jax.jit(flax_module.init)(key(0), q, kv, v)  # same rng, same initial params
  assert_trees_equal(jax.jit(jattn_module.init)(key(0), q, kv, v), initial)
  variables = perturb(initial, 1)

  cotangent = normal(13, linen_module_output_shape(case))

  def check(module):
    """Output, sown weights and gradients of ``module``, in one compiled function."""

    def run(variables, q):
      return module.apply(
        variables, q, kv, v, mask=mask, sow_weights=True, mutable=["intermediates"]
      )

    def loss(variables, q):
      return (run(variables, q)[0] * cotangent).sum()

    @jax.jit
    def outputs_and_grads(variables, q):
      return run(variables, q), jax.grad(loss, argnums=(0, 1))(variables, q)

    return outputs_and_grads(variables, q)

  (expected, expected_sown), expected_grads = check(flax_module)
  (actual, actual_sown), actual_grads = check(jattn_module)
  np.testing.assert_allclose(actual, expected, RTOL, ATOL)
  assert_trees_close(actual_sown, expected_sown)
  assert_trees_close(actual_grads, expected_grads, rtol=1e-4, atol=1e-5)


NNX_PARITY_CASES = {
  # F=8, N=2, H=4: self-attention.
  "F8-N2-H4": dict(options=dict(in_features=8, num_heads=2, qkv_features=8), q=(2, 5, 8)),
  # F=6, N=4, K=2, H=2: grouped-query cross-attention, other kv features, float padding mask.
  "F6-N4-K2-H2-cross": dict(
    options=dict(
      in_features=6, num_heads=4, num_kv_heads=2, qkv_features=8, in_kv_features=3, out_features=5
    ),
    q=(2, 4, 6),
    kv=(2, 7, 3),
    pad=True,
  ),
  # F=5, N=1, H=3: is_causal, QK LayerNorm, highest precision.
  "F5-N1-H3-causal-ln": dict(
    options=dict(
      in_features=5, num_heads=1, qkv_features=3, normalize_qk=True, precision="highest"
    ),
    q=(2, 6, 5),
    is_causal=True,
  ),
  # F=4, N=4, K=1, H=3: multi-query, two batch dims, is_causal and a padding mask.
  "F4-N4-K1-H3-batch2": dict(
    options=dict(in_features=4, num_heads=4, num_kv_heads=1, qkv_features=12),
    q=(2, 3, 5, 4),
    kv=(2, 3, 5, 4),
    pad=True,
    is_causal=True,
  ),
}


@pytest.mark.parametrize("case", list(NNX_PARITY_CASES))
def test_jattn_nnx_matches_flax(case):
  case = NNX_PARITY_CASES[case]
  options = case["options"] | dict(decode=False)
  flax_module = nnx.MultiHeadAttention(**options, rngs=nnx.Rngs(0))
  jattn_module = load("jattn").nnx.MultiHeadAttention(**options, rngs=nnx.Rngs(0))
  # Same rngs, same initial params.
  expected_params = params_of(flax_module)
  assert jax.tree.map(jnp.shape, params_of(jattn_module)) == jax.tree.map(
    jnp.shape, expected_params
  )
  assert_trees_equal(params_of(jattn_module), expected_params)
  params = perturb(expected_params, 1)
  set_params(flax_module, params)
  set_params(jattn_module, params)
  q, kv, v, mask = parity_inputs(case)
  call = dict(mask=mask, is_causal=case.get("is_causal", False))

  def run(module):
    return nnx.capture(module, nnx.Intermediate)(q, kv, v, **call, sow_weights=True)

  expected, expected_sown = run(flax_module)
  actual, actual_sown = run(jattn_module)
  np.testing.assert_allclose(actual, expected, RTOL, ATOL)
  assert_trees_close(nnx.to_pure_dict(actual_sown), nnx.to_pure_dict(expected_sown))
  cotangent = normal(13, expected.shape)

  def grads(module):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, q):
      return (nnx.merge(graphdef, params, rest)(q, kv, v, **call) * cotangent).sum()

    params_grad, q_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, q)
    return nnx.to_pure_dict(params_grad), q_grad

  assert_trees_close(grads(jattn_module), grads(flax_module), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_jattn_decode_matches_flax(api):
  B, L, F, N = 2, 5, 8, 2
  x = normal(0, (B, L, F))
  jattn_impl = load("jattn")
  if api == "linen":
    options = dict(num_heads=N, qkv_features=8, decode=True)
    flax_module = nn.MultiHeadDotProductAttention(**options)
    jattn_module = jattn_impl.linen.MultiHeadDotProductAttention(**options)
    variables = flax_module.init(key(1), x)
    params = perturb(variables["params"], 2)
    caches = [variables["cache"], variables["cache"]]
    for i in range(L):
      token = x[:, i : i + 1]
      outputs = []
      for j, module in enumerate((flax_module, jattn_module)):
        y, updates = module.apply({"params": params, "cache": caches[j]}, token, mutable=["cache"])
        caches[j] = updates["cache"]
        outputs.append(y)
      np.testing.assert_allclose(outputs[1], outputs[0], RTOL, ATOL)
    assert_trees_close(caches[1], caches[0])
    return
  options = dict(in_features=F, num_heads=N, num_kv_heads=1, qkv_features=8, decode=True)
  flax_module = nnx.MultiHeadAttention(**options, rngs=nnx.Rngs(0))
  jattn_module = jattn_impl.nnx.MultiHeadAttention(**options, rngs=nnx.Rngs(0))
  params = perturb(params_of(flax_module), 2)
  for module in (flax_module, jattn_module):
    set_params(module, params)
    module.init_cache(x.shape)
  for i in range(L):
    token = x[:, i : i + 1]
    np.testing.assert_allclose(jattn_module(token), flax_module(token), RTOL, ATOL)
  assert_trees_close(
    nnx.to_pure_dict(nnx.state(jattn_module, nnx.Cache)),
    nnx.to_pure_dict(nnx.state(flax_module, nnx.Cache)),
  )


def keep_dtypes(arrays, *, dtype=None, inexact=True):
  """A promote_dtype function other than Flax's default."""
  del dtype, inexact
  return arrays


def flax_default(api, where, argument):
  if api == "linen":
    return nn.MultiHeadDotProductAttention.__dataclass_fields__[argument].default
  method = nnx.MultiHeadAttention.__init__ if where == "init" else nnx.MultiHeadAttention.__call__
  return inspect.signature(method).parameters[argument].default


UNSUPPORTED = [  # (api, where, argument, a non-default value)
  *(("linen", "init", name, lax.dot_general) for name in ("qkv_dot_general", "out_dot_general")),
  *(
    ("linen", "init", name, lambda: lax.dot_general)
    for name in ("qkv_dot_general_cls", "out_dot_general_cls")
  ),
  *(
    ("linen", "init", name, lambda: jnp.einsum)
    for name in ("qk_attn_weights_einsum_cls", "attn_weights_value_einsum_cls")
  ),
  *(
    ("nnx", "init", name, keep_dtypes)
    for name in ("qkv_promote_dtype", "out_promote_dtype", "ln_promote_dtype")
  ),
  *(("nnx", "init", name, lax.dot_general) for name in ("qkv_dot_general", "out_dot_general")),
  *(
    ("nnx", "init", name, lambda: lax.dot_general)
    for name in ("qkv_dot_general_cls", "out_dot_general_cls")
  ),
  *(
    ("nnx", "call", name, jax.sharding.PartitionSpec()) for name in ("out_sharding", "qkv_sharding")
  ),
]


@pytest.mark.parametrize(
  "api, where, argument, value", UNSUPPORTED, ids=[f"{a}-{n}" for a, _, n, _ in UNSUPPORTED]
)
def test_jattn_rejects_unsupported_arguments(api, where, argument, value):
  """jattn takes Flax's default of the argument, and names it when given anything else."""
  jattn_impl = load("jattn")
  x = jnp.ones((2, 3, 4))

  def run(value):
    if api == "linen":
      module = jattn_impl.linen.MultiHeadDotProductAttention(num_heads=2, **{argument: value})
      return module.init_with_output(key(0), x)[0]
    if where == "init":
      return jattn_impl.nnx.MultiHeadAttention(
        num_heads=2, in_features=4, decode=False, rngs=nnx.Rngs(0), **{argument: value}
      )(x)
    module = jattn_impl.nnx.MultiHeadAttention(
      num_heads=2, in_features=4, decode=False, rngs=nnx.Rngs(0)
    )
    return module(x, **{argument: value})

  assert run(flax_default(api, where, argument)).shape == x.shape
  with pytest.raises((ValueError, TypeError, NotImplementedError), match=argument) as error:
    run(value)
  assert "unexpected keyword" not in str(error.value)
