"""What README.md says of each peer, checked against the installed peer.

README.md's "How it compares" table, its "Semantics worth knowing", "Guarantees" and
"Switching from Flax" sections state how ``jax.nn.dot_product_attention``, Flax (linen and
nnx), Equinox and PyTorch's ``scaled_dot_product_attention`` behave. Each test here runs one
such claim on both sides, jattn's and the peer's, with tiny shapes and real values, so that a
peer's release that changes its behaviour (or a README edit that misstates it) fails here.
jax.nn and Flax are dependencies; torch and Equinox are optional and skip where missing.

Layouts: jattn, jax.nn and Flax take ``(B, T, N, H)``; torch takes ``(B, N, T, H)``
(:func:`to_torch` / :func:`from_torch`); Equinox takes unbatched ``(T, F)``.
"""

import dataclasses
import inspect

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
from jattn import convert

# Jitted once per shape: quicker than eager dispatch, even for one call.
attend = jax.jit(jattn.dot_product_attention, static_argnames=("is_causal", "alignment"))
attend_params = jax.jit(jattn.attention)
jax_nn_attend = jax.jit(jax.nn.dot_product_attention, static_argnames=("is_causal",))
linen_attend = jax.jit(flax.linen.dot_product_attention)
nnx_attend = jax.jit(nnx.dot_product_attention, static_argnames=("is_causal",))


def qkv(rng, T=3, S=5, N=2, K=None, H=4, D=None):
  """Random ``q (1, T, N, H)``, ``k (1, S, K, H)``, ``v (1, S, K, D)``."""
  K, D = K or N, D or H
  return normal(rng, (1, T, N, H)), normal(rng, (1, S, K, H)), normal(rng, (1, S, K, D))


def to_torch(torch, x):
  """``(B, T, N, H)`` NumPy -> ``(B, N, T, H)`` tensor, torch's SDPA layout."""
  return torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 1, 2)))


def from_torch(x):
  return np.swapaxes(x.numpy(), 1, 2)


def sdpa(torch, q, k, v, **kwargs):
  """PyTorch's ``scaled_dot_product_attention`` on jattn's layout, back as NumPy."""
  mask = kwargs.pop("attn_mask", None)
  if mask is not None:
    kwargs["attn_mask"] = torch.from_numpy(mask)
  out = torch.nn.functional.scaled_dot_product_attention(
    to_torch(torch, q), to_torch(torch, k), to_torch(torch, v), **kwargs
  )
  return from_torch(out)


def close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# --- Fully masked row: jattn zeros; jax.nn, Flax, Equinox the mean of all values; torch zeros. ---


def row_1_masked(T=3, S=5):
  """A mask ``(1, 1, T, S)`` hiding every key from query 1 only."""
  mask = np.ones((1, 1, T, S), bool)
  mask[..., 1, :] = False
  return mask


def test_fully_masked_row_jattn_zeros_jax_and_flax_uniform_average(rng):
  q, k, v = qkv(rng)
  mask = row_1_masked()
  uniform = v.mean(axis=1)[0]  # (K, D): every key's value, equally weighted

  out = attend(q, k, v, mask=mask)
  np.testing.assert_array_equal(out[0, 1], np.zeros_like(uniform))
  grads = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v, mask=mask).sum(), (0, 1, 2)))
  assert all(np.isfinite(g).all() for g in grads(q, k, v))  # "zeros, finite grads"

  for peer in (jax_nn_attend, linen_attend, nnx_attend):
    close(peer(q, k, v, mask=mask)[0, 1], uniform)
  # The rows that see keys are the same everywhere: only the empty row differs.
  close(jax_nn_attend(q, k, v, mask=mask)[0, [0, 2]], out[0, [0, 2]])


def test_fully_masked_row_flax_module_mean_jattn_module_out_bias(rng):
  x = normal(rng, (1, 5, 8))
  mask = row_1_masked(5, 5)
  flax_module = flax.linen.MultiHeadDotProductAttention(num_heads=2)
  params = jax.jit(flax_module.init)(jax.random.key(0), x)["params"]
  params["out"]["bias"] = normal(rng, (8,))  # nonzero, so "the out bias" is seen
  theirs = jax.jit(flax_module.apply)({"params": params}, x, mask=mask)
  ours = jax.jit(jattn.linen.MultiHeadDotProductAttention(num_heads=2).apply)(
    {"params": params}, x, mask=mask
  )
  close(ours[0, 1], params["out"]["bias"])  # "output 0 (the out bias after projection)"
  # Flax: "the mean of every value", projected; scale 0 makes jattn's weights uniform too.
  close(theirs[0, 1], attend_params(params, x[0], x[0], scale=0.0)[1])
  close(theirs[0, [0, 2, 3, 4]], ours[0, [0, 2, 3, 4]])


def test_fully_masked_row_equinox_uniform_average(rng):
  eqx = pytest.importorskip("equinox")
  shapes = eqx.filter_eval_shape(eqx.nn.MultiheadAttention, 2, 4, key=jax.random.key(0))
  eye = jnp.eye(4)  # F = 4, qk_size = vo_size = 2, no biases: every array is set here
  projections = ("query_proj", "key_proj", "value_proj", "output_proj")
  m = eqx.tree_at(lambda m: [getattr(m, p).weight for p in projections], shapes, [eye] * 4)
  x_q, x_kv = normal(rng, (3, 4)), normal(rng, (5, 4))
  mask = row_1_masked()[0, 0]  # (T, S): Equinox is unbatched

  out = np.asarray(eqx.filter_jit(m)(x_q, x_kv, x_kv, mask=jnp.asarray(mask)))
  close(out[1], x_kv.mean(axis=0))  # identity projections: the mean of the raw values
  # jattn, given the same weights: zeros on that row, Equinox's numbers on the others.
  mine = np.asarray(attend_params(convert.from_equinox(m), x_q, x_kv, mask=mask))
  np.testing.assert_array_equal(mine[1], np.zeros(4, np.float32))
  assert not np.allclose(out[1], 0.0, atol=1e-3)
  close(mine[[0, 2]], out[[0, 2]])


def test_fully_masked_row_torch_zeros(rng):
  torch = pytest.importorskip("torch")
  q, k, v = qkv(rng)
  mask = row_1_masked()
  out = sdpa(torch, q, k, v, attn_mask=mask)
  np.testing.assert_array_equal(out[0, 1], np.zeros((2, 4), np.float32))  # "zeros (2.13 checked)"
  close(out, attend(q, k, v, mask=mask))  # and the same as jattn's rows


# --- NaN in a masked key's value reaches the rows through 0 x NaN in P V. ---


def test_nan_value_of_a_masked_key_reaches_the_rows_everywhere(rng):
  torch = pytest.importorskip("torch")
  q, k, v = qkv(rng)
  mask = np.ones((1, 1, 3, 5), bool)
  mask[..., 4] = False  # no query attends key 4 ...
  v_nan = v.copy()
  v_nan[0, 4, 0, 0] = np.nan  # ... whose value holds a NaN (head 0, feature 0)

  outputs = {
    "jattn": np.asarray(attend(q, k, v_nan, mask=mask)),
    "jax.nn": np.asarray(jax_nn_attend(q, k, v_nan, mask=mask)),
    "torch": sdpa(torch, q, k, v_nan, attn_mask=mask),
  }
  for name, out in outputs.items():
    assert np.isnan(out[0, :, 0, 0]).all(), name  # every row of that head and feature
    assert np.isfinite(out[0, :, 1]).all(), name  # the other head never meets it
  # The control: the same call with a finite number in its place is finite everywhere.
  assert np.isfinite(attend(q, k, v, mask=mask)).all()


def test_nan_masked_key_reaches_the_rows_in_reverse_mode_everywhere(rng):
  torch = pytest.importorskip("torch")
  q, k, v = qkv(rng)
  mask = np.ones((1, 1, 3, 5), bool)
  mask[..., 4] = False
  k_nan = k.copy()
  k_nan[0, 4, 0, 0] = np.nan  # a masked key of head 0 (feature 0): NaN scores, under the mask

  for name, f in (("jattn", attend), ("jax.nn", jax_nn_attend)):
    assert np.isfinite(f(q, k_nan, v, mask=mask)).all(), name  # masked like any other score
    dq = jax.jit(jax.grad(lambda q, f=f: f(q, k_nan, v, mask=mask).sum()))(q)
    # 0 x NaN in dS K: every row's dq of head 0, feature 0 is NaN; head 1 never meets it.
    assert np.isnan(dq[0, :, 0, 0]).all(), name
    assert np.isfinite(dq[0, :, 1]).all(), name
  tq = to_torch(torch, q).requires_grad_()
  out = torch.nn.functional.scaled_dot_product_attention(
    tq, to_torch(torch, k_nan), to_torch(torch, v), attn_mask=torch.from_numpy(mask)
  )
  out.sum().backward()
  dq = from_torch(tq.grad)
  assert np.isnan(dq[0, :, 0, 0]).all()  # alike in reverse
  assert np.isfinite(dq[0, :, 1]).all()
  # Not in README.md: torch 2.13 does not mask a NaN score (its boolean mask is an additive
  # -inf, and NaN - inf is NaN), so its forward rows of head 0 are NaN already.
  out = from_torch(out.detach())
  assert np.isnan(out[0, :, 0]).all()
  assert np.isfinite(out[0, :, 1]).all()


# --- Causal with T != S: jax.nn and torch align top-left; jattn's default is bottom-right. ---


@pytest.mark.parametrize("T", [3, 5])
def test_causal_alignment(rng, T):
  torch = pytest.importorskip("torch")
  q, k, v = qkv(rng, T=T, S=5)
  jax_nn = jax_nn_attend(q, k, v, is_causal=True)
  close(sdpa(torch, q, k, v, is_causal=True), jax_nn)
  close(nnx_attend(q, k, v, is_causal=True), jax_nn)  # Flax nnx: jax.nn's
  close(attend(q, k, v, is_causal=True, alignment="top_left"), jax_nn)
  close(jax_nn[0, 0], v[0, 0])  # top-left: query 0 sees key 0 alone

  bottom_right = attend(q, k, v, is_causal=True)  # the default
  if T == 5:
    close(bottom_right, jax_nn)  # "The two agree when T == S"
  else:
    assert np.abs(np.asarray(bottom_right) - np.asarray(jax_nn)).max() > 0.1
    close(bottom_right[0, -1], attend(q[:, -1:], k, v)[0, 0])  # sees all


# --- Flax's constructor and call arguments, by name and position, in jattn's modules. ---

POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
BY_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
LINEN = ("MultiHeadDotProductAttention", "MultiHeadAttention", "SelfAttention")


def parameters(fn):
  """``fn``'s parameters but ``self`` and ``**kwargs``, in order."""
  params = inspect.signature(fn).parameters.values()
  return [p for p in params if p.name != "self" and p.kind != inspect.Parameter.VAR_KEYWORD]


def mismatches(theirs, ours):
  """How ``ours`` fails to take every argument of ``theirs`` (both lists of Parameters).

  Each of Flax's names must be a named parameter of jattn's that takes a keyword (not
  swallowed by ``**kwargs``), and Flax's positional parameters must be the first positional
  ones of jattn's, in the same order, so ``Cls(a, b, c)`` binds the same names.
  """
  named = {p.name: p for p in ours}
  problems = [f"{p.name}: missing" for p in theirs if p.name not in named]
  problems += [
    f"{p.name}: not a keyword"
    for p in theirs
    if p.name in named and named[p.name].kind not in BY_KEYWORD
  ]
  positional = [p.name for p in theirs if p.kind in POSITIONAL]
  our_positional = [p.name for p in ours if p.kind in POSITIONAL][: len(positional)]
  if our_positional != positional:
    problems.append(f"positional order: Flax {positional}, jattn {our_positional}")
  return problems


def linen_fields(cls):
  """A linen module's constructor: its dataclass fields, in ``__init__``'s order.

  Flax's Module machinery appends ``parent`` and ``name`` after every field of every module
  (a subclass's own fields come before them), so they are checked to end both lists and
  the order check covers the fields before them.
  """
  init = parameters(cls.__init__)
  assert [p.name for p in init] == [f.name for f in dataclasses.fields(cls) if f.init]
  assert [p.name for p in init[-2:]] == ["parent", "name"]
  return init[:-2]


def flax_and_jattn(kind):
  if kind == "nnx":
    return nnx.MultiHeadAttention, jattn.nnx.MultiHeadAttention
  return getattr(flax.linen, kind), getattr(jattn.linen, kind)


def arguments(cls, method):
  return linen_fields(cls) if method == "fields" else parameters(getattr(cls, method))


SIGNATURES = [
  *[(name, method) for method in ("fields", "__call__") for name in LINEN],
  *[("nnx", method) for method in ("__init__", "__call__", "init_cache", "set_view")],
]


@pytest.mark.parametrize(("kind", "method"), SIGNATURES, ids=[f"{k}.{m}" for k, m in SIGNATURES])
def test_every_flax_argument_is_a_jattn_argument(kind, method):
  theirs, ours = (arguments(cls, method) for cls in flax_and_jattn(kind))
  assert len(theirs) >= 2  # something to compare (init_cache has two)
  assert mismatches(theirs, ours) == []


def test_the_argument_check_catches_a_missing_or_moved_argument():
  theirs = linen_fields(flax.linen.MultiHeadDotProductAttention)
  ours = linen_fields(jattn.linen.MultiHeadDotProductAttention)
  assert mismatches(theirs, ours) == []
  without = [p for p in ours if p.name != "decode"]
  assert mismatches(theirs, without)[0] == "decode: missing"
  swapped = [ours[1], ours[0], *ours[2:]]  # dtype before num_heads
  moved = [p.name for p in swapped[: len(theirs)]]
  assert mismatches(theirs, swapped) == [
    f"positional order: Flax {[p.name for p in theirs]}, jattn {moved}"
  ]
  call = parameters(nnx.MultiHeadAttention.__call__)
  kw_only = [p.replace(kind=inspect.Parameter.POSITIONAL_ONLY) for p in call]
  assert "mask: not a keyword" in mismatches(call, kw_only)


# --- nnx: no decode argument anywhere means decode=False in jattn; Flax raises. ---


def test_nnx_without_decode_argument(rng):
  x = normal(rng, (1, 3, 8))
  theirs, ours = nnx.jit(
    lambda: tuple(cls(2, 8, rngs=nnx.Rngs(0)) for cls in flax_and_jattn("nnx"))
  )()
  with pytest.raises(ValueError, match="No `decode` argument was provided"):
    theirs(x)
  call, call_decode_false = nnx.jit(lambda m, x: m(x)), nnx.jit(lambda m, x: m(x, decode=False))
  out = call(ours, x)
  np.testing.assert_array_equal(out, call_decode_false(ours, x))
  close(out, call_decode_false(theirs, x))  # Flax's output once told


# --- Grouped-query heads: jax.nn yes, Flax linen no, nnx yes, Equinox no, torch enable_gqa. ---


def test_grouped_query_heads(rng):
  q, k, v = qkv(rng, N=4, K=2)
  out = attend(q, k, v)
  close(jax_nn_attend(q, k, v), out)  # K = 2 < N = 4
  assert np.abs(np.asarray(out[..., 0, :] - out[..., 1, :])).max() > 0.1  # heads differ

  assert "num_kv_heads" not in {f.name for f in dataclasses.fields(flax.linen.MultiHeadAttention)}
  layer = nnx.eval_shape(
    lambda: nnx.MultiHeadAttention(4, 8, qkv_features=16, num_kv_heads=2, rngs=nnx.Rngs(0))
  )
  assert layer.key.kernel.shape == (8, 2, 4)  # two key heads for four query heads


def test_grouped_query_heads_torch(rng):
  torch = pytest.importorskip("torch")
  q, k, v = qkv(rng, N=4, K=2)
  close(sdpa(torch, q, k, v, enable_gqa=True), attend(q, k, v))
  with pytest.raises(RuntimeError, match=r"size of tensor a \(4\) must match .* b \(2\)"):
    sdpa(torch, q, k, v)  # without the flag: K must equal N


def test_grouped_query_heads_equinox():
  eqx = pytest.importorskip("equinox")
  names = inspect.signature(eqx.nn.MultiheadAttention.__init__).parameters
  assert not any("kv" in n or "group" in n for n in names)  # no argument for fewer K/V heads
  m = eqx.filter_eval_shape(eqx.nn.MultiheadAttention, 4, 8, qk_size=2, key=jax.random.key(0))
  assert m.key_proj.out_features == m.query_proj.out_features == 4 * 2  # N key heads always


# --- Value head size D != query/key head size H: jattn yes, jax.nn no, Equinox and torch yes. ---


def test_value_head_size_differs(rng):
  q, k, v = qkv(rng, H=4, D=6)
  out = attend(q, k, v)
  assert out.shape == (1, 3, 2, 6)
  with pytest.raises(ValueError, match=r"value shape should be \[1, 5, 2, 4\]"):
    jax_nn_attend(q, k, v)
  # The first four features of the values are attended alike whatever D is.
  close(out[..., :4], jax_nn_attend(q, k, v[..., :4]))


def test_value_head_size_differs_torch(rng):
  torch = pytest.importorskip("torch")
  q, k, v = qkv(rng, H=4, D=6)
  close(sdpa(torch, q, k, v), attend(q, k, v))


def test_value_head_size_differs_equinox(rng):
  eqx = pytest.importorskip("equinox")
  shapes = eqx.filter_eval_shape(
    eqx.nn.MultiheadAttention, 2, 8, qk_size=4, vo_size=6, key=jax.random.key(0)
  )
  m = jax.tree.map(
    lambda s: normal(rng, s.shape) if isinstance(s, jax.ShapeDtypeStruct) else s, shapes
  )
  x_q, x_kv = normal(rng, (3, 8)), normal(rng, (5, 8))
  params = convert.from_equinox(m)
  assert params["value"]["kernel"].shape == (8, 2, 6)
  close(eqx.filter_jit(m)(x_q, x_kv, x_kv), attend_params(params, x_q, x_kv))


# --- Forward mode: jattn's blockwise path has a JVP; PyTorch's fused CPU SDPA has none. ---


# torch's forward AD loads decompositions through its own deprecated torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_jattn_blockwise_yes_torch_sdpa_no(rng):
  torch = pytest.importorskip("torch")
  q, k, v = qkv(rng, T=5)
  tangents = qkv(np.random.default_rng(1), T=5)
  blockwise = jax.jit(
    lambda *a: jattn.dot_product_attention(*a, implementation="blockwise", block_kv=2)
  )
  _, jvp = jax.jvp(blockwise, (q, k, v), tangents)
  _, jax_nn_jvp = jax.jvp(jax_nn_attend, (q, k, v), tangents)
  close(jvp, jax_nn_jvp)
  forward_ad = torch.autograd.forward_ad
  with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="forward AD"):
    dual = forward_ad.make_dual(to_torch(torch, q), to_torch(torch, tangents[0]))
    torch.nn.functional.scaled_dot_product_attention(dual, dual, dual)
