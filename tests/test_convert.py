"""jattn.convert: weights to and from torch.nn.MultiheadAttention and equinox.nn.MultiheadAttention.

Parity is checked by equal outputs on random weights and inputs; torch and equinox
are optional, so each group skips where its library is missing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal

import jattn
from jattn import convert

attend = jax.jit(jattn.attention)  # one compilation per shape; eager dispatch is slower here


def random_params(F=8, N=2, H=4, *, Fkv=None, K=None, D=None, O=8, bias=False, seed=0):
  """A jattn pytree of random NumPy arrays (quicker than jattn.init in these many small tests)."""
  rng = np.random.default_rng(seed)
  Fkv, K, D = Fkv or F, K or N, D or H
  shapes = {"query": (F, N, H), "key": (Fkv, K, H), "value": (Fkv, K, D), "out": (N, D, O)}
  if O is None:
    del shapes["out"]
  params = {name: {"kernel": normal(rng, shape)} for name, shape in shapes.items()}
  if bias:
    for name, shape in shapes.items():
      params[name]["bias"] = normal(rng, shape[-1:] if name == "out" else shape[1:])
  return params


def assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


# --- Without torch: the state dict as NumPy arrays. ---


def test_state_dict_layout_is_head_major():
  # Query head n reads rows n*H:(n+1)*H of in_proj_weight; out head n reads those columns.
  N, H = 2, 3
  E = N * H
  w = np.arange(3 * E * E, dtype=np.float32).reshape(3 * E, E)
  w_o = np.arange(E * E, dtype=np.float32).reshape(E, E)
  p = convert.from_torch({"in_proj_weight": w, "out_proj.weight": w_o}, num_heads=N)
  assert sorted(p) == ["key", "out", "query", "value"]
  assert all("bias" not in entry for entry in p.values())
  np.testing.assert_array_equal(p["query"]["kernel"][:, 1, :], w[H : 2 * H].T)
  np.testing.assert_array_equal(p["key"]["kernel"][:, 0, :], w[E : E + H].T)
  np.testing.assert_array_equal(p["value"]["kernel"][:, 1, :], w[2 * E + H :].T)
  np.testing.assert_array_equal(p["out"]["kernel"][1], w_o[:, H:].T)


@pytest.mark.parametrize("kv_features", [8, 5])
def test_state_dict_round_trip_without_torch(kv_features):
  p = jax.tree.map(jnp.asarray, random_params(Fkv=kv_features, bias=True))
  state = convert.to_torch(p)
  packed = kv_features == 8
  assert ("in_proj_weight" in state) == packed
  assert ("k_proj_weight" in state) == (not packed)
  assert_same_tree(convert.from_torch(state, num_heads=2), p)


def test_bfloat16_is_kept():
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), random_params())
  state = convert.to_torch(p)
  assert state["in_proj_weight"].dtype == jnp.bfloat16
  assert_same_tree(convert.from_torch(state, num_heads=2), p)


def test_one_head_2d_kernels_export():
  p = {name: {"kernel": jnp.ones((4, 4))} for name in ("query", "key", "value", "out")}
  state = convert.to_torch(p)
  assert state["in_proj_weight"].shape == (12, 4)
  assert convert.from_torch(state, num_heads=1)["out"]["kernel"].shape == (1, 4, 4)


def _torch_state(E=8, kdim=None, bias=True):
  rng = np.random.default_rng(0)
  state = {}
  if kdim is None:
    state["in_proj_weight"] = normal(rng, (3 * E, E))
  else:
    state |= {"q_proj_weight": normal(rng, (E, E))}
    state |= {k: normal(rng, (E, kdim)) for k in ("k_proj_weight", "v_proj_weight")}
  if bias:
    state["in_proj_bias"] = normal(rng, (3 * E,))
  state["out_proj.weight"] = normal(rng, (E, E))
  if bias:
    state["out_proj.bias"] = normal(rng, (E,))
  return state


@pytest.mark.parametrize(
  "edit, num_heads, match",
  [
    ({}, None, "num_heads is required"),
    ({}, 3, "not divisible by 3 heads"),
    ({"bias_k": np.zeros((1, 1, 8))}, 2, "add_bias_kv"),
    ({"attn.in_proj_weight": np.zeros((24, 8))}, 2, r"unexpected .*'attn.in_proj_weight'"),
    ({"in_proj_weight": np.zeros((24, 6))}, 2, r"'in_proj_weight' must have shape \(24, 8\)"),
    ({"in_proj_bias": np.zeros(8)}, 2, r"'in_proj_bias' must have shape \(24,\)"),
    ({"out_proj.weight": np.zeros((8, 6))}, 2, r"'out_proj.weight' must have shape"),
    ({"out_proj.bias": np.zeros(6)}, 2, r"'out_proj.bias' must have shape \(8,\)"),
    ({"q_proj_weight": np.zeros((8, 8))}, 2, "both 'in_proj_weight' and"),
  ],
)
def test_from_state_dict_errors(edit, num_heads, match):
  with pytest.raises(ValueError, match=match):
    convert.from_torch(_torch_state() | edit, num_heads=num_heads)


def test_from_state_dict_errors_separate_layout():
  state = _torch_state(kdim=6)
  with pytest.raises(ValueError, match=r"missing \['v_proj_weight'\]"):
    convert.from_torch({k: v for k, v in state.items() if k != "v_proj_weight"}, num_heads=2)
  with pytest.raises(ValueError, match="kdim == vdim"):
    convert.from_torch(state | {"v_proj_weight": np.zeros((8, 5))}, num_heads=2)
  with pytest.raises(ValueError, match=r"no 'out_proj\.weight'"):
    convert.from_torch({k: v for k, v in state.items() if k != "out_proj.weight"}, num_heads=2)


@pytest.mark.parametrize(
  "kwargs, edit, match",
  [
    (dict(N=4, H=2, K=2), None, r"4 query heads and 2 key/value heads.*key kernel \(8, 2, 2\)"),
    (dict(D=3), None, r"value head size D \(3\).*H \(4\)"),
    (dict(O=None), None, "no 'out' entry"),
    (dict(O=6), None, r"O = 6"),
    (dict(N=1), None, r"F = 8"),  # E = N * H = 4 != F
    (dict(bias=True), lambda p: p["key"].pop("bias"), "'key': False"),
    ({}, lambda p: p.update(sinks=np.zeros(2, np.float32)), r"no place for .*\['sinks'\]"),
    ({}, lambda p: p.update(key_ln={"scale": np.ones(4, np.float32)}), r"\['key_ln'\]"),
    ({}, lambda p: p["value"].update(kernel=np.ones((5, 2, 4), np.float32)), "one input"),
  ],
)
def test_to_torch_errors(kwargs, edit, match):
  p = random_params(**kwargs)
  if edit is not None:
    edit(p)
  with pytest.raises(ValueError, match=match):
    convert.to_torch(p)


# --- torch.nn.MultiheadAttention: equal outputs. ---


def _torch_mha(torch, E, N, **kwargs):
  torch.manual_seed(0)
  m = torch.nn.MultiheadAttention(E, N, batch_first=True, **kwargs).eval()
  with torch.no_grad():
    for param in m.parameters():  # torch initialises the biases to zero: randomise them too
      param.normal_()
  return m


def _torch_out(torch, m, x_q, x_kv):
  with torch.no_grad():
    q, kv = torch.from_numpy(x_q), torch.from_numpy(x_kv)
    out, weights = m(q, kv, kv, need_weights=False)
  assert weights is None
  return out.numpy()


@pytest.mark.parametrize(
  "kwargs", [{}, {"bias": False}, {"kdim": 5, "vdim": 5}, {"kdim": 5, "vdim": 5, "bias": False}]
)
def test_from_torch_equal_outputs(kwargs, rng):
  torch = pytest.importorskip("torch")
  E, N = 8, 2
  m = _torch_mha(torch, E, N, **kwargs)
  p = convert.from_torch(m)
  Fkv = kwargs.get("kdim", E)
  assert p["key"]["kernel"].shape == (Fkv, N, E // N)
  assert ("bias" in p["query"]) == kwargs.get("bias", True)
  assert p["query"]["kernel"].dtype == jnp.float32
  x_q, x_kv = normal(rng, (3, 5, E)), normal(rng, (3, 7, Fkv))
  np.testing.assert_allclose(
    attend(p, x_q, x_kv), _torch_out(torch, m, x_q, x_kv), rtol=1e-5, atol=1e-5
  )
  if Fkv == E:  # self-attention: torch's fused fast path (eval, no grad, query is key is value)
    with torch.no_grad():
      expected = m(*[torch.from_numpy(x_q)] * 3, need_weights=False)[0].numpy()
    np.testing.assert_allclose(attend(p, x_q, x_q), expected, rtol=1e-5, atol=1e-5)
  # The state dict reads the same, given num_heads; the round trip is exact.
  assert_same_tree(convert.from_torch(m.state_dict(), num_heads=N), p)
  state = convert.to_torch(p)
  expected = m.state_dict()
  assert list(state) == list(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(state[key], value.numpy())


@pytest.fixture(scope="module")
def init_params():
  """jattn.init's pytree that both torch and equinox can hold: F = O = N * H = 8, Fkv = 6."""
  bias_init = jax.nn.initializers.normal(1.0)  # nonzero biases, so that they are tested
  return jattn.init(
    jax.random.key(1), 8, 4, num_heads=2, kv_features=6, out_features=8, use_bias=True,
    bias_init=bias_init,
  )  # fmt: skip


@pytest.mark.parametrize("packed", [False, True])
def test_to_torch_loads_a_module_with_equal_outputs(packed, init_params, rng):
  torch = pytest.importorskip("torch")
  p = jax.tree.map(jnp.asarray, random_params(bias=True)) if packed else init_params
  Fkv = p["key"]["kernel"].shape[0]
  m = torch.nn.MultiheadAttention(8, 2, kdim=Fkv, vdim=Fkv, batch_first=True)
  assert convert.to_torch(p, m.eval()) is m
  assert m._qkv_same_embed_dim == packed
  x_q, x_kv = normal(rng, (2, 4, 8)), normal(rng, (2, 6, Fkv))
  np.testing.assert_allclose(
    _torch_out(torch, m, x_q, x_kv), attend(p, x_q, x_kv), rtol=1e-5, atol=1e-5
  )
  assert_same_tree(convert.from_torch(m), p)


def test_to_torch_bfloat16_module():
  torch = pytest.importorskip("torch")
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), random_params())
  m = torch.nn.MultiheadAttention(8, 2, bias=False, dtype=torch.bfloat16)
  convert.to_torch(p, m)
  assert m.in_proj_weight.dtype == torch.bfloat16
  assert_same_tree(convert.from_torch(m), p)


def test_torch_errors():
  torch = pytest.importorskip("torch")
  with pytest.raises(ValueError, match="add_bias_kv"):
    convert.from_torch(torch.nn.MultiheadAttention(8, 2, add_bias_kv=True))
  with pytest.raises(ValueError, match="add_zero_attn"):
    convert.from_torch(torch.nn.MultiheadAttention(8, 2, add_zero_attn=True))
  with pytest.raises(ValueError, match="num_heads=4 but the module has 2"):
    convert.from_torch(torch.nn.MultiheadAttention(8, 2), num_heads=4)
  with pytest.raises(ValueError, match="kdim == vdim"):
    convert.from_torch(torch.nn.MultiheadAttention(8, 2, kdim=5, vdim=6))
  with pytest.raises(TypeError, match="Linear"):
    convert.from_torch(torch.nn.Linear(8, 8))

  p = random_params()
  with pytest.raises(ValueError, match="the module has 4 heads but the pytree has 2"):
    convert.to_torch(p, torch.nn.MultiheadAttention(8, 4, bias=False))
  with pytest.raises(ValueError, match=r"MultiheadAttention\(8, 2, bias=False, kdim=8"):
    convert.to_torch(p, torch.nn.MultiheadAttention(8, 2))  # has biases
  with pytest.raises(ValueError, match="does not match"):
    convert.to_torch(p, torch.nn.MultiheadAttention(8, 2, bias=False, add_bias_kv=True))


# --- equinox.nn.MultiheadAttention: equal outputs. ---

# query_size 8, key/value size 5, qk_size H = 4, vo_size D = 6, output 7; no key bias.
EQX_CONFIG = dict(num_heads=3, query_size=8, key_size=5, value_size=5, output_size=7)
EQX_CONFIG |= dict(qk_size=4, vo_size=6, use_query_bias=True, use_value_bias=True)
EQX_CONFIG |= dict(use_output_bias=True)


def _eqx_call(m, x_q, x_kv):
  import equinox as eqx

  return eqx.filter_jit(lambda m, x_q, x_kv: m(x_q, x_kv, x_kv))(m, x_q, x_kv)


def test_from_equinox_equal_outputs(rng):
  eqx = pytest.importorskip("equinox")
  m = eqx.nn.MultiheadAttention(**EQX_CONFIG, key=jax.random.key(0))  # random biases too
  p = convert.from_equinox(m)
  assert jax.tree.map(lambda a: a.shape, p) == {
    "query": {"kernel": (8, 3, 4), "bias": (3, 4)},
    "key": {"kernel": (5, 3, 4)},
    "value": {"kernel": (5, 3, 6), "bias": (3, 6)},
    "out": {"kernel": (3, 6, 7), "bias": (7,)},
  }
  x_q, x_kv = normal(rng, (4, 8)), normal(rng, (6, 5))  # equinox: unbatched (T, F)
  expected = _eqx_call(m, x_q, x_kv)
  np.testing.assert_allclose(attend(p, x_q, x_kv), expected, rtol=1e-5, atol=1e-5)

  # Back into a fresh module of the same configuration: the same function again.
  fresh = eqx.nn.MultiheadAttention(**EQX_CONFIG, key=jax.random.key(1))
  loaded = convert.to_equinox(p, fresh)
  assert_same_tree(convert.from_equinox(loaded), p)
  np.testing.assert_allclose(_eqx_call(loaded, x_q, x_kv), expected, rtol=1e-6, atol=1e-6)
  assert not np.array_equal(fresh.query_proj.weight, loaded.query_proj.weight)  # not in place


def test_to_equinox_from_jattn_init(init_params, rng):
  eqx = pytest.importorskip("equinox")
  m = eqx.nn.MultiheadAttention(2, 8, 6, 6, 8, qk_size=4, vo_size=4, key=jax.random.key(3))
  with pytest.raises(ValueError, match=r"params\['query'\].*bias \(2, 4\).*bias None"):
    convert.to_equinox(init_params, m)  # the module has no biases
  biased = dict.fromkeys(("use_query_bias", "use_key_bias", "use_value_bias", "use_output_bias"))
  biased = {k: True for k in biased}
  m = eqx.nn.MultiheadAttention(
    2, 8, 6, 6, 8, qk_size=4, vo_size=4, **biased, key=jax.random.key(3)
  )
  m = convert.to_equinox(init_params, m)
  x_q, x_kv = normal(rng, (4, 8)), normal(rng, (6, 6))
  np.testing.assert_allclose(
    _eqx_call(m, x_q, x_kv), attend(init_params, x_q, x_kv), rtol=1e-5, atol=1e-5
  )
  assert_same_tree(convert.from_equinox(m), init_params)

  # What the module cannot hold.
  with pytest.raises(TypeError, match=r"equinox\.nn\.MultiheadAttention"):
    convert.to_equinox(init_params, eqx.nn.Linear(2, 2, key=jax.random.key(0)))
  for kwargs, match in [
    (dict(D=3), r"params\['value'\] \(kernel \(6, 2, 3\).*weight \(8, 6\)"),
    (dict(bias=False), r"params\['query'\] \(kernel \(8, 2, 4\), bias None\).*bias \(8,\)"),
    (dict(O=6), r"params\['out'\] \(kernel \(2, 4, 6\)"),
    (dict(N=4, H=2), "the module has 2 heads but the pytree has 4"),
    (dict(K=1), "2 query heads and 1 key/value heads"),
    (dict(O=None), "no 'out' entry"),
  ]:
    with pytest.raises(ValueError, match=match):
      convert.to_equinox(random_params(**{"Fkv": 6, "bias": True, **kwargs}), m)


def test_from_equinox_errors():
  eqx = pytest.importorskip("equinox")
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"key_size \(5\) must equal value_size \(6\)"):
    convert.from_equinox(eqx.nn.MultiheadAttention(2, 8, key_size=5, value_size=6, key=key))
  with pytest.raises(TypeError, match=r"equinox\.nn\.MultiheadAttention"):
    convert.from_equinox(eqx.nn.Linear(2, 2, key=key))
