"""jattn.init and params validation: layout, initializers, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn


def shapes(params):
  return jax.tree.map(jnp.shape, params)


def test_layout_is_flax_multi_head():
  p = jattn.init(
    jax.random.key(0),
    10,
    4,
    num_heads=6,
    num_kv_heads=2,
    v_head_dim=5,
    kv_features=7,
    out_features=9,
    use_bias=True,
  )
  assert shapes(p) == {
    "query": {"kernel": (10, 6, 4), "bias": (6, 4)},
    "key": {"kernel": (7, 2, 4), "bias": (2, 4)},
    "value": {"kernel": (7, 2, 5), "bias": (2, 5)},
    "out": {"kernel": (6, 5, 9), "bias": (9,)},
  }
  assert shapes(jattn.init(jax.random.key(0), 4, 3)) == {
    name: {"kernel": (4, 1, 3)} for name in ("query", "key", "value")
  }


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (
      dict(num_kv_heads=4),
      ValueError,
      r"query heads \(6\) must be a multiple of key/value heads \(4\)",
    ),
    (dict(q_kernel=(4, 0, 3)), ValueError, r"\['query'\]\['kernel'\] must not be empty"),
    (dict(features=5), ValueError, r"x has 5 features"),
  ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_params_errors_also_under_jit(kwargs, error, match, jit):
  params = jattn.init(jax.random.key(0), 4, 3, num_heads=6)
  if "num_kv_heads" in kwargs:
    params["key"]["kernel"] = jnp.ones((4, kwargs["num_kv_heads"], 3))
    params["value"]["kernel"] = jnp.ones((4, kwargs["num_kv_heads"], 3))
  if "q_kernel" in kwargs:
    params["query"]["kernel"] = jnp.ones(kwargs["q_kernel"])
  x = jnp.ones((2, kwargs.get("features", 4)))
  fn = jax.jit(jattn.self_attention) if jit else jattn.self_attention
  with pytest.raises(error, match=match):
    fn(params, x)


def test_numpy_integer_sizes_are_accepted():
  p = jattn.init(jax.random.key(0), np.int64(4), np.int32(3), num_heads=np.int64(2))
  assert p["query"]["kernel"].shape == (4, 2, 3)


@pytest.mark.parametrize(
  "name, fan, var_scale, dist",
  [
    ("xavier_uniform", "avg", 1.0, "uniform"),
    ("glorot_normal", "avg", 1.0, "normal"),
    ("he_uniform", "in", 2.0, "uniform"),
    ("kaiming_normal", "in", 2.0, "normal"),
    ("lecun_uniform", "in", 1.0, "uniform"),
    ("lecun_normal", "in", 1.0, "normal"),
  ],
)
def test_variance_scaling_initializers_have_the_right_variance(name, fan, var_scale, dist):
  F, N, H, O = 512, 4, 16, 128  # fan-in 512 and fan-out 64: xavier and lecun differ by 4.5x
  params = jattn.init(jax.random.key(0), F, H, num_heads=N, out_features=O, kernel_init=name)
  for kernel, fan_in, fan_out in (
    (params["query"]["kernel"], F, N * H),  # (F, N, H): fan-out N * H
    (params["out"]["kernel"], N * H, O),  # (N, H, O): fan-in N * H
  ):
    kernel = np.asarray(kernel)
    fan_value = fan_in if fan == "in" else (fan_in + fan_out) / 2
    assert kernel.var() == pytest.approx(var_scale / fan_value, rel=0.06)
    if dist == "uniform":
      assert np.abs(kernel).max() <= np.sqrt(3 * var_scale / fan_value) + 1e-6


def test_normal_initializer_uses_stddev():
  for name in ("normal", "gaussian"):
    kernel = jattn.init(jax.random.key(1), 128, 64, num_heads=2, kernel_init=name, stddev=0.5)
    assert np.asarray(kernel["key"]["kernel"]).std() == pytest.approx(0.5, rel=0.03)


def test_callable_initializer_and_dtype():
  p = jattn.init(
    jax.random.key(0), 4, 3, kernel_init=jax.nn.initializers.ones, dtype=jnp.bfloat16, use_bias=True
  )
  for leaf in jax.tree.leaves(p):
    assert leaf.dtype == jnp.bfloat16
  assert np.all(np.asarray(p["value"]["kernel"], np.float32) == 1.0)


def test_init_is_deterministic_and_keys_differ():
  a, b = jattn.init(jax.random.key(3), 8, 4), jattn.init(jax.random.key(3), 8, 4)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.allclose(a["query"]["kernel"], a["key"]["kernel"])


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (
      dict(kernel_init="uniformish"),
      ValueError,
      r"unknown initializer 'uniformish'.*xavier_uniform",
    ),
    (dict(num_heads=0), ValueError, "num_heads must be positive"),
    (dict(num_heads=4, num_kv_heads=3), ValueError, r"multiple of num_kv_heads"),
    (dict(out_features=-1), ValueError, "out_features must be positive"),
    (dict(dtype=jnp.int32), TypeError, "floating"),
    (dict(kernel_init="normal", stddev=0.0), ValueError, "stddev must be positive"),
    (dict(kernel_init="he_normal", stddev=0.1), ValueError, "stddev applies to"),
    (dict(bias_init=jax.nn.initializers.ones), ValueError, "use_bias=False"),
  ],
)
def test_init_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    jattn.init(jax.random.key(0), 8, 4, **kwargs)


def test_params_errors_name_the_problem():
  params, x = jattn.walkthrough_example()
  missing = {k: v for k, v in params.items() if k != "value"}
  with pytest.raises(ValueError, match=r"missing the 'value' entry"):
    jattn.self_attention(missing, x)
  with pytest.raises(ValueError, match=r"x has 5 features .* expects 4"):
    jattn.self_attention(params, jnp.ones((3, 5)))
  with pytest.raises(ValueError, match=r"rank >= 2"):
    jattn.self_attention(params, jnp.ones((4,)))
  bad = dict(params, key={"kernel": jnp.ones((4, 2))})
  with pytest.raises(ValueError, match=r"same head size.*\(4, 1, 3\).*\(4, 1, 2\)"):
    jattn.self_attention(bad, x)
  bad = dict(params, query={"kernel": jnp.ones((4, 3)), "bias": jnp.ones((4,))})
  with pytest.raises(ValueError, match=r"\['query'\]\['bias'\] must have shape \(3,\)"):
    jattn.self_attention(bad, x)
  bad = dict(params, out={"kernel": jnp.ones((2, 3, 4))})
  with pytest.raises(ValueError, match=r"params\['out'\]\['kernel'\] must be"):
    jattn.self_attention(bad, x)
  with pytest.raises(TypeError, match="mapping"):
    jattn.self_attention([1, 2], x)
  with pytest.raises(ValueError, match=r"x_q \(2, 3, 4\) and x_kv \(3, 3, 4\)"):
    jattn.attention(params, jnp.ones((2, 3, 4)), jnp.ones((3, 3, 4)))
  with pytest.raises(
    TypeError, match=r"option\(s\) \['is_casual'\]; the options are \['bias', 'mask',"
  ):
    jattn.self_attention(params, x, is_casual=True)  # a typo is an error, never ignored


def test_out_projection_and_concatenated_heads():
  x = jnp.ones((2, 5, 8))
  concat = jattn.init(jax.random.key(0), 8, 4, num_heads=3, v_head_dim=2)
  assert jattn.self_attention(concat, x).shape == (2, 5, 6)
  out = dict(concat, out={"kernel": jnp.ones((3, 2, 7))})
  assert jattn.self_attention(out, x).shape == (2, 5, 7)
  flat = dict(concat, out={"kernel": jnp.ones((6, 7))})  # (N * D, O) is accepted too
  np.testing.assert_array_equal(jattn.self_attention(flat, x), jattn.self_attention(out, x))


def test_concatenated_heads_are_in_head_order():
  """Without "out", columns n*D:(n+1)*D of the output are head n's attention, computed alone."""
  N, K, F, H, D = 4, 2, 5, 3, 2  # D != N, so an interleaved (D, N) order is wrong too
  params = jattn.init(jax.random.key(0), F, H, num_heads=N, num_kv_heads=K, v_head_dim=D)
  x = np.random.default_rng(0).standard_normal((2, 6, F)).astype(np.float32)
  out = np.asarray(jattn.self_attention(params, x, is_causal=True))
  assert out.shape == (2, 6, N * D)
  kernel = {name: np.asarray(params[name]["kernel"], np.float64) for name in params}
  causal = np.tril(np.ones((6, 6), bool))
  for n in range(N):
    q = x @ kernel["query"][:, n]  # (2, T, H)
    k, v = (x @ kernel[name][:, n // (N // K)] for name in ("key", "value"))
    scores = np.where(causal, q @ np.swapaxes(k, -1, -2) / np.sqrt(H), -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    head = (weights / weights.sum(-1, keepdims=True)) @ v  # (2, T, D)
    np.testing.assert_allclose(out[..., n * D : (n + 1) * D], head, rtol=1e-5, atol=1e-6)
