"""jax's own ``dot_product_attention`` tests (``tests/nn_test.py``), ported to jattn.

Each test re-checks, for ``jattn.dot_product_attention`` on both of its CPU paths
(``implementation="naive"`` and ``"blockwise"`` with 8 x 8 tiles, so several tiles
per head), a behaviour that jax tests for ``jax.nn.dot_product_attention``. The
expected values come from ``jax.nn.dot_product_attention(..., implementation="xla")``
and from :func:`reference`, written here from the definition. The code is new; only
the behaviours and the case lists follow jax (Apache-2.0). Sizes are smaller than
jax's (T = S = 36 instead of 128) so that the file runs in seconds on a CPU; 36 also
gives the blockwise path a ragged last tile, and jax's padding lengths (T // 2,
T // 4, ...) then end inside tiles.

Ported (jax test -> test here):

- ``testDotProductAttention`` (dtype x GQA group x vmap, forward, VJP and the
  returned log-sum-exp) -> :func:`test_gqa_matches_jax_nn` and
  :func:`test_lse_is_differentiable`. float32 is added to jax's bfloat16/float16;
  instead of jax's full product (12 cases per path) each path gets a Latin square
  of 3 cases that meets every dtype, every group size and vmap.
- ``testDotProductAttentionMask`` (bias, causal, padding, custom mask and their
  combinations, sliding window; forward and VJP incl. the bias gradient)
  -> :func:`test_masks_match_jax_nn`, all 8 modes on both paths, in float32 (not
  jax's bfloat16: the dtypes are covered above), plus the log-sum-exp.
- ``testDotProductAttentionFloat64MaskDebugInfs`` -> :func:`test_float64_mask_under_debug_infs`.
- ``testDotProductAttentionBiasGradient`` (batch 1 or 16, with or without vmap)
  -> :func:`test_bias_gradient_matches_jax_nn`: batch 1 without vmap on the naive
  path, batch 3 with vmap on the blockwise one (both paths' bias gradients are
  also checked in every bias mode of :func:`test_masks_match_jax_nn`).
- ``testDotProductAttention_localWindowSizeWithoutMask``
  -> :func:`test_local_window_without_mask`.

Added, for behaviours jax exercises only implicitly: an explicit and a traced
``scale`` (:func:`test_scale`), and unbatched, cross-length and value-head-size
layouts (:func:`test_layouts`).

Differences from jax.nn that the ports account for:

- jattn returns the log-sum-exp as ``(..., N, T)`` in float32 at least; jax.nn's
  ``return_residual=True`` gives ``(..., T, N)`` in the inputs' dtype.
- jax.nn stops the gradient of its log-sum-exp, so jax's test gets the same VJP
  with and without a log-sum-exp cotangent. jattn's log-sum-exp is differentiable:
  the VJP with only the output cotangent is compared with jax.nn, and the full VJP
  with a reference and with finite differences (``jax.test_util.check_grads``).
- jax.nn places queries top-left for ``is_causal`` when ``T != S``; jattn's default
  is bottom-right, so the cross-length test passes ``alignment="top_left"``.
- A query that sees no key: jax.nn averages all values (zero only for padded
  queries), jattn returns zeros. jax's cases never produce one outside padding.

Left out:

- ``implementation="cudnn"`` and the cuDNN-backend checks in every test above
  (``_check_cudnn_backend``, compute-capability and CUDA-version skips): jattn has
  no cuDNN path, and they need an NVIDIA GPU.
- ``testScaledMatmul``, ``testScaledDotGeneral`` (FP8/MXFP8 block-scaled matmuls)
  and every test of other ``jax.nn`` functions (activations, softmax, one-hot,
  initializers): not attention.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from numpy.testing import assert_allclose, assert_array_equal

import jattn

IMPLS = ("naive", "blockwise")
TOL = {  # forward and gradient tolerances per input dtype (jax's: 1e-2 to 2e-2 for both halves)
  jnp.float32: dict(rtol=1e-5, atol=2e-6),
  jnp.bfloat16: dict(rtol=2e-2, atol=2e-2),
  jnp.float16: dict(rtol=5e-3, atol=5e-3),
}
B, T, S, N, H = 2, 36, 36, 4, 8  # batch, query/key lengths (not multiples of 8), heads, head size

# These tests spend their time compiling, not computing: compile with LLVM at -O0, which
# halves that time. The HLO programs, hence what they compute, are unchanged.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def attend(impl, q, k, v, **options):
  """jattn on one path, compiled; the blockwise one with 8 x 8 tiles, so several per head."""
  if impl == "blockwise":
    options = dict(block_q=8, block_kv=8, **options)
  return jit_call(jattn.dot_product_attention, q, k, v, implementation=impl, **options)


def _reference(
  q,
  k,
  v,
  *,
  bias=None,
  mask=None,
  scale=None,
  is_causal=False,
  q_lengths=None,
  kv_lengths=None,
  window=None,
  offset=0,
):
  """Attention from its definition, differentiable in every input, ``(out, lse)``.

  ``q (..., T, N, H)``, ``k (..., S, K, H)``, ``v (..., S, K, D)``: key/value head
  ``n // (N // K)`` serves query head ``n``. Query ``t`` sits at position
  ``t + offset`` among the keys. A query with no visible key gives zeros and a
  log-sum-exp of ``-inf``. Computed in float32 at least; the output in q's dtype.
  """
  dtype = jnp.promote_types(q.dtype, jnp.float32)
  groups = q.shape[-2] // k.shape[-2]
  qc = q.astype(dtype)
  kc = jnp.repeat(k.astype(dtype), groups, axis=-2)
  vc = jnp.repeat(v.astype(dtype), groups, axis=-2)
  if scale is None:
    scale = 1.0 / np.sqrt(q.shape[-1])
  scores = jnp.einsum("...TNH,...SNH->...NTS", qc, kc) * scale
  shape = scores.shape
  if bias is not None:
    scores = scores + jnp.broadcast_to(bias, shape).astype(dtype)
  t = np.arange(q.shape[-3])[:, None] + offset
  s = np.arange(k.shape[-3])[None, :]
  visible = np.ones((len(t), s.shape[1]), bool)
  if is_causal:
    visible &= s <= t
  if window is not None:
    left, right = (window, window) if isinstance(window, int) else window
    visible &= (s >= t - left) & (s <= t + right)
  visible = jnp.broadcast_to(visible, shape)
  if mask is not None:
    visible = visible & jnp.broadcast_to(mask, shape)
  lengths_shape = (*shape[:-3], 1, 1, 1)
  if q_lengths is not None:
    rows = jnp.broadcast_to(jnp.arange(shape[-2])[:, None], shape)
    visible = visible & (rows < jnp.broadcast_to(q_lengths.reshape(lengths_shape), shape))
  if kv_lengths is not None:
    cols = jnp.broadcast_to(jnp.arange(shape[-1]), shape)
    visible = visible & (cols < jnp.broadcast_to(kv_lengths.reshape(lengths_shape), shape))
  seen = visible.any(axis=-1)
  masked = jnp.where(visible, scores, -jnp.inf)
  # Rows that see nothing take a harmless finite row, so no NaN reaches a gradient.
  lse_safe = jax.nn.logsumexp(jnp.where(seen[..., None], masked, 0.0), axis=-1)
  weights = jnp.exp(masked - lse_safe[..., None])
  out = jnp.einsum("...NTS,...SND->...TND", weights, vc)
  return out.astype(q.dtype), jnp.where(seen, lse_safe, -jnp.inf)


def reference(q, k, v, **options):
  """:func:`_reference`, compiled once per set of static options."""
  return jit_call(_reference, q, k, v, **options)


def jax_nn(q, k, v, **options):
  """``jax.nn.dot_product_attention(..., implementation="xla")``, compiled."""
  return jit_call(jax.nn.dot_product_attention, q, k, v, implementation="xla", **options)


def jit_call(fn, *args, **options):
  """``fn(*args, **options)`` compiled as one program, not one compile per operation.

  Array options are traced, the others (flags, windows, Python scales) static. Under
  a transformation (tracer arguments) ``fn`` is simply called: the outer ``jit``
  compiles it.
  """
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, options))):
    return fn(*args, **options)
  arrays = {name: x for name, x in options.items() if isinstance(x, (jax.Array, np.ndarray))}
  static = tuple(sorted((name, x) for name, x in options.items() if name not in arrays))
  return _jitted(fn, static)(*args, **arrays)


@functools.cache
def _jitted(fn, static):
  return jit(functools.partial(fn, **dict(static)))


def close(actual, expected, **tol):
  assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), **tol)


def inputs(seed, shapes, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes]


# --- testDotProductAttention: dtypes, grouped-query attention, vmap, VJP, log-sum-exp ------


def gqa_inputs(dtype, groups):
  K = N // groups
  shapes = [(B, T, N, H), (B, S, K, H), (B, S, K, H), (B, T, N, H)]
  # q, k, v, the output's cotangent and the log-sum-exp's (jattn's lse is float32 at least).
  return *inputs(groups, shapes, dtype), *inputs(100 + groups, [(B, N, T)])


@functools.cache
def jax_nn_gqa(dtype, groups):
  """jax.nn without grouping (keys and values repeated per group), as jax's test does."""
  q, k, v, g, _ = gqa_inputs(dtype, groups)
  k_rep, v_rep = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)

  def run(q, k, v):
    sdpa = functools.partial(jax.nn.dot_product_attention, implementation="xla")
    (out, lse), pullback = jax.vjp(lambda *a: sdpa(*a, return_residual=True), q, k, v)
    return out, lse, pullback((g, jnp.zeros_like(lse)))

  # jax.nn asks for F16_F16_F32 dots, which XLA:CPU refuses only when a jit is lowered;
  # called eagerly, jax.nn falls back to the default precision.
  out, lse, (dq, dk, dv) = (run if dtype == jnp.float16 else jit(run))(q, k_rep, v_rep)
  # Back to grouped keys and values: sum the gradients of each group's copies.
  dk = dk.reshape(B, S, N // groups, groups, H).sum(axis=3)
  dv = dv.reshape(B, S, N // groups, groups, H).sum(axis=3)
  return out, lse, (dq, dk, dv)


@functools.cache
def definition_gqa_vjp(dtype, groups):
  """The VJP of :func:`reference` with cotangents for both the output and the log-sum-exp."""
  q, k, v, g, g_lse = gqa_inputs(dtype, groups)
  return jit(lambda *a: jax.vjp(_reference, *a)[1]((g, g_lse)))(q, k, v)


# jax takes the product of dtype (bfloat16, float16), group size (1, 2, 4) and vmap. Here
# each path meets every group size (K = 4, 2, 1: multi-head, grouped-query, multi-query)
# and every dtype (float32 added) once, in a Latin square, and vmap once.
GQA_CASES = [
  ("naive", 1, jnp.float32, False),
  ("naive", 2, jnp.bfloat16, True),
  ("naive", 4, jnp.float16, False),
  ("blockwise", 1, jnp.bfloat16, False),
  ("blockwise", 2, jnp.float16, False),
  ("blockwise", 4, jnp.float32, True),
]


@pytest.mark.parametrize(
  "impl, groups, dtype, use_vmap",
  GQA_CASES,
  ids=[f"{i}-G{g}-{d.__name__}{'-vmap' * v}" for i, g, d, v in GQA_CASES],
)
def test_gqa_matches_jax_nn(impl, groups, dtype, use_vmap):
  q, k, v, g, g_lse = gqa_inputs(dtype, groups)
  sdpa = functools.partial(attend, impl, return_lse=True)
  if use_vmap:  # each call then sees unbatched (T, N, H) inputs
    sdpa = jax.vmap(sdpa)

  @jit
  def run(q, k, v, g, g_lse):
    (out, lse), pullback = jax.vjp(sdpa, q, k, v)
    return out, lse, pullback((g, jnp.zeros_like(lse))), pullback((g, g_lse))

  out, lse, grads, grads_with_lse = run(q, k, v, g, g_lse)
  ref_out, ref_lse, ref_grads = jax_nn_gqa(dtype, groups)
  tol = TOL[dtype]
  assert out.shape == q.shape and out.dtype == dtype
  assert lse.shape == (B, N, T) and lse.dtype == jnp.float32
  close(out, ref_out, **tol)
  close(lse, jnp.swapaxes(ref_lse, -1, -2), **tol)  # jax.nn: (B, T, N) in the inputs' dtype
  for name, ours, theirs in zip("qkv", grads, ref_grads, strict=True):
    assert ours.dtype == dtype, name
    close(ours, theirs, err_msg=f"d{name}", **tol)
  # jax.nn stops the log-sum-exp's gradient; jattn's flows: check it against the definition.
  ref_grads_with_lse = definition_gqa_vjp(dtype, groups)
  for name, ours, theirs in zip("qkv", grads_with_lse, ref_grads_with_lse, strict=True):
    close(ours, theirs, err_msg=f"d{name} with an lse cotangent", **tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_lse_is_differentiable(impl):
  """jax.nn's log-sum-exp is a stopped residual; jattn's has true derivatives (float64)."""
  with jax.enable_x64(True):
    q, k, v, bias, ct = inputs(
      7, [(1, 16, 2, 4), (1, 20, 1, 4), (1, 20, 1, 4), (2, 16, 20), (1, 2, 16)], jnp.float64
    )
    mask = np.random.default_rng(8).random((2, 16, 20)) > 0.3
    mask[0, 3] = mask[1, 0] = False  # two queries that see nothing: lse -inf
    options = dict(mask=jnp.asarray(mask), is_causal=True, scale=0.7)
    seen = np.isfinite(np.asarray(reference(q, k, v, bias=bias, **options)[1]))
    assert not seen[0, 0, 3] and not seen[0, 1, 0] and seen.mean() > 0.8

    def lse(q, k, bias):  # jattn's log-sum-exp, 0 for the rows that see nothing
      out = attend(impl, q, k, v, bias=bias, return_lse=True, alignment="top_left", **options)
      assert out[1].dtype == jnp.float64
      return jnp.where(seen, out[1], 0.0)

    def definition(q, k, bias):
      return jnp.where(seen, _reference(q, k, v, bias=bias, **options)[1], 0.0)

    assert_allclose(jit(lse)(q, k, bias), jit(definition)(q, k, bias), rtol=1e-12)
    # Forward mode against finite differences; reverse mode against the definition, below.
    check_grads(jax.jit(lse), (q, k, bias), order=1, modes=("fwd",), eps=1e-4)
    grads = jit(lambda *a: jax.vjp(lse, *a)[1](ct))(q, k, bias)
    ref_grads = jit(lambda *a: jax.vjp(definition, *a)[1](ct))(q, k, bias)
    for name, ours, theirs in zip(("q", "k", "bias"), grads, ref_grads, strict=True):
      assert np.abs(np.asarray(theirs)).max() > 0.1, name
      assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12, err_msg=f"d{name}")


# --- testDotProductAttentionMask ------------------------------------------------------------

MASK_MODES = [
  ("bias",),
  ("causal",),
  ("padding",),
  ("custom",),
  ("causal", "padding"),
  ("custom", "padding"),
  ("bias", "causal"),
  ("causal", "sliding_window"),
]


def mask_case(mode):
  """Inputs and options for one of jax's mask modes, and the cotangent of the output."""
  q, k, v, g, bias = inputs(3, [(B, T, N, H)] + [(B, S, N, H)] * 2 + [(B, T, N, H), (1, N, T, S)])
  options = dict(is_causal="causal" in mode)
  if "padding" in mode:
    options["query_seq_lengths"] = jnp.array([T // 2, T // 4], jnp.int32)
    options["key_value_seq_lengths"] = jnp.array([S // 4, S // 2], jnp.int32)
  if "custom" in mode:  # a causal mask, given as a mask
    options["mask"] = jnp.tril(jnp.ones((T, S), bool))[None, None]
  if "sliding_window" in mode:
    options["local_window_size"] = (3, 2) if options["is_causal"] else (3, 0)
  return (q, k, v, bias if "bias" in mode else None, g), options


@functools.cache
def jax_nn_masked(mode):
  (q, k, v, bias, g), options = mask_case(mode)

  @jit
  def run(q, k, v, bias):
    def sdpa(q, k, v, bias):
      return jax.nn.dot_product_attention(
        q, k, v, bias, implementation="xla", return_residual=True, **options
      )

    (out, lse), pullback = jax.vjp(sdpa, q, k, v, bias)
    return out, lse, pullback((g, jnp.zeros_like(lse)))

  return run(q, k, v, bias)


@pytest.mark.parametrize("mode", MASK_MODES, ids="+".join)
@pytest.mark.parametrize("impl", IMPLS)
def test_masks_match_jax_nn(impl, mode):
  (q, k, v, bias, g), options = mask_case(mode)

  @jit
  def run(q, k, v, bias, g):
    def sdpa(q, k, v, bias):
      return attend(impl, q, k, v, bias=bias, return_lse=True, **options)

    (out, lse), pullback = jax.vjp(sdpa, q, k, v, bias)
    return out, lse, pullback((g, jnp.zeros_like(lse)))

  out, lse, grads = run(q, k, v, bias, g)
  ref_out, ref_lse, ref_grads = jax_nn_masked(mode)
  tol = TOL[jnp.float32]
  close(out, ref_out, **tol)
  for name, ours, theirs in zip(("q", "k", "v", "bias"), grads, ref_grads, strict=True):
    if theirs is None:
      assert ours is None
      continue
    assert ours.shape == theirs.shape, name
    close(ours, theirs, err_msg=f"d{name}", **tol)
  # The log-sum-exp of the queries that are not padding (jax.nn's padded ones are finite).
  ref_lse = np.swapaxes(np.asarray(ref_lse), -1, -2)
  q_lengths = np.asarray(options.get("query_seq_lengths", [T] * B))
  for b, n in enumerate(q_lengths):
    close(lse[b, :, :n], ref_lse[b, :, :n], **tol)
    assert_array_equal(lse[b, :, n:], -np.inf)
    if n < T:  # padded queries give zeros and pass no gradient to q
      assert_array_equal(out[b, n:], 0.0)
      assert_array_equal(grads[0][b, n:], 0.0)


# --- testDotProductAttentionFloat64MaskDebugInfs --------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_mask_under_debug_infs(impl):
  """A mask in float64 creates no inf (jax issue 37422): debug_infs stays quiet."""
  T, S, K, N, H = 5, 7, 3, 6, 11
  with jax.enable_x64(True):
    mask = jnp.arange(S) <= S // 2  # (S,): broadcast over heads and queries
    q, k, v = inputs(11, [(T, N, H), (S, K, H), (S, K, H)], jnp.float64)
    blocks = dict(block_q=2, block_kv=4) if impl == "blockwise" else {}
    sdpa = functools.partial(jattn.dot_product_attention, implementation=impl, mask=mask, **blocks)
    with jax.debug_infs(True):  # not jitted, so that every operation's result is checked
      zeros = sdpa(*(jnp.zeros_like(a) for a in (q, k, v)))
      out = sdpa(q, k, v)
      out.block_until_ready()
    assert out.dtype == jnp.float64
    assert_array_equal(zeros, 0.0)
    assert_allclose(out, reference(q, k, v, mask=mask)[0], rtol=1e-12, atol=1e-14)


# --- testDotProductAttentionBiasGradient ----------------------------------------------------


@pytest.mark.parametrize(
  "impl, batch_size, use_vmap", [("naive", 1, False), ("blockwise", 3, True)]
)
def test_bias_gradient_matches_jax_nn(impl, batch_size, use_vmap):
  x, bias = inputs(batch_size, [(batch_size, S, N, H), (batch_size, N, S, S)])
  mask = jnp.ones((1, 1, S), bool)  # rank 3, broadcast against (..., N, S, S)

  def ours(x, bias):
    return attend(impl, x, x, x, bias=bias, mask=mask)

  def theirs(x, bias):
    return jax.nn.dot_product_attention(x, x, x, bias, mask, implementation="xla")

  if use_vmap:
    ours, theirs = jax.vmap(ours), jax.vmap(theirs)

  def forward_and_vjp(fn):
    def run(x, bias):
      out, pullback = jax.vjp(fn, x, bias)
      return out, pullback(x)  # jax's test uses x itself as the output cotangent

    return jit(run)(x, bias)

  out, (dx, dbias) = forward_and_vjp(ours)
  ref_out, (ref_dx, ref_dbias) = forward_and_vjp(theirs)
  close(out, ref_out, **TOL[jnp.float32])
  assert dbias.shape == bias.shape
  close(dbias, ref_dbias, **TOL[jnp.float32])
  close(dx, ref_dx, **TOL[jnp.float32])


# --- testDotProductAttention_localWindowSizeWithoutMask ------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_local_window_without_mask(impl):
  q, k, v = inputs(5, [(B, T, N, H), (B, S, N, H), (B, S, N, H)])
  outs = {}
  for window in [(16, 16), (1, 1), (3, 0)]:
    outs[window] = attend(impl, q, k, v, local_window_size=window)
    expected = jax_nn(q, k, v, local_window_size=window)
    close(outs[window], expected, err_msg=f"window {window}", **TOL[jnp.float32])
  assert not np.allclose(outs[(16, 16)], outs[(1, 1)], atol=1e-3)
  assert_array_equal(attend(impl, q, k, v, local_window_size=1), outs[(1, 1)])  # symmetric


# --- scale and layouts (exercised by jax's tests through their defaults) ---------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_scale(impl):
  """A static scale as jax.nn's; a traced one, differentiated, as the definition's."""
  q, k, v = inputs(6, [(B, T, N, H), (B, S, 2, H), (B, S, 2, H)])
  out = attend(impl, q, k, v, is_causal=True, scale=0.3)
  close(out, jax_nn(q, k, v, is_causal=True, scale=0.3), **TOL[jnp.float32])

  def ours(scale):
    out = attend(impl, q, k, v, is_causal=True, scale=scale)
    return jnp.sum(out**2), out

  def theirs(scale):
    return jnp.sum(_reference(q, k, v, is_causal=True, scale=scale)[0] ** 2)

  (_, traced_out), d_scale = jit(jax.value_and_grad(ours, has_aux=True))(0.3)
  close(traced_out, out, **TOL[jnp.float32])
  assert_allclose(d_scale, jit(jax.grad(theirs))(0.3), rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_layouts(impl):
  """Unbatched (T, N, H) inputs with T != S, several batch dimensions, and D != H."""
  tol = TOL[jnp.float32]
  q, k, v = inputs(9, [(16, N, H), (24, 2, H), (24, 2, H)])
  out = attend(impl, q, k, v, is_causal=True, alignment="top_left")
  assert out.shape == (16, N, H)
  close(out, jax_nn(q, k, v, is_causal=True), **tol)
  # Bottom-right, jattn's default: query t sits at key position t + S - T.
  close(
    attend(impl, q, k, v, is_causal=True), reference(q, k, v, is_causal=True, offset=8)[0], **tol
  )

  q, k, v = inputs(10, [(2, 3, 16, N, H), (2, 3, 24, 1, H), (2, 3, 24, 1, 5)])
  lengths = jnp.array([[24, 9, 1], [3, 17, 24]], jnp.int32)
  out = attend(impl, q, k, v, key_value_seq_lengths=lengths)
  assert out.shape == (2, 3, 16, N, 5)
  close(out, reference(q, k, v, kv_lengths=lengths)[0], **tol)
