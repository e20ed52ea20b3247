"""The variants models train with: packed documents (segment ids, positions), chunked
attention, ALiBi, soft-capping and sinks, on every path and in every AD mode.

The reference here is written from the definition with explicit index grids and no
jattn code: ``s = q . k / sqrt(H) - slope * |p_q - p_k|``, ``s = c * tanh(s / c)``,
visible iff same segment, ``p_k <= p_q`` (causal), same chunk ``p // C``; then a
softmax whose denominator also holds ``exp(sink)``, and the weighted sum.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import examples
from flax import nnx as flax_nnx
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from numpy.testing import assert_allclose, assert_array_equal

import jattn
import jattn.linen
import jattn.nnx
from jattn import _masks

B, T, N, K, H = 2, 21, 4, 2, 8


def reference(
  q, k, v, *, causal=False, seg=None, pos=None, chunk=None, slopes=None, cap=None, sinks=None
):
  """Attention from the definition, ``T == S``; also returns the log-sum-exp."""
  Bq, Tq, Nq, Hq = q.shape
  G = Nq // k.shape[2]
  kf, vf = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  s = jnp.einsum("btnh,bsnh->bnts", q, kf) / np.sqrt(Hq)
  idx = jnp.arange(Tq)
  p = jnp.broadcast_to(idx, (Bq, Tq)) if pos is None else pos
  p_q, p_k = p[:, None, :, None], p[:, None, None, :]
  if slopes is not None:
    s = s - slopes[None, :, None, None] * jnp.abs(p_q - p_k)
  if cap is not None:
    s = cap * jnp.tanh(s / cap)
  visible = jnp.ones(s.shape, bool)
  if seg is not None:
    visible &= seg[:, None, :, None] == seg[:, None, None, :]
  if causal:
    visible &= p_k <= p_q
  if chunk is not None:
    visible &= p_q // chunk == p_k // chunk
  s = jnp.where(visible, s, -jnp.inf)
  if sinks is not None:  # one more column: the sink, with a zero value
    column = jnp.broadcast_to(sinks[None, :, None, None], (Bq, Nq, Tq, 1)).astype(s.dtype)
    s = jnp.concatenate([s, column], axis=-1)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(s - m)
  total = jnp.sum(e, axis=-1, keepdims=True)
  w = e / jnp.where(total > 0, total, 1.0)
  lse = jnp.where(
    total[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(total > 0, total, 1.0))[..., 0], -jnp.inf
  )
  if sinks is not None:
    w = w[..., :-1]
  return jnp.einsum("bnts,bsnd->btnd", w, vf), lse


def documents(rng, lengths):
  """Segment ids and positions restarting at each document, for each row of ``lengths``."""
  seg = np.concatenate([[np.repeat(np.arange(len(row)), row)] for row in lengths])
  pos = np.concatenate([[np.concatenate([np.arange(n) for n in row])] for row in lengths])
  return jnp.asarray(seg, jnp.int32), jnp.asarray(pos, jnp.int32)


@pytest.fixture
def problem(rng):
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
  seg, pos = documents(rng, [[8, 5, 8], [3, 16, 2]])
  return q, k, v, seg, pos


# (jattn options, reference options) of each variant alone and of all of them at once.
def variants(seg, pos):
  slopes, sinks = jattn.alibi_slopes(N), jnp.array([0.5, -1.0, 2.0, 0.0])
  return {
    "segments": (dict(q_segment_ids=seg), dict(seg=seg)),
    "segments_causal_positions": (
      dict(
        q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos, is_causal=True
      ),
      dict(seg=seg, pos=pos, causal=True),
    ),
    "chunked_causal": (dict(attention_chunk_size=6, is_causal=True), dict(chunk=6, causal=True)),
    "alibi": (dict(alibi_slopes=slopes), dict(slopes=slopes)),
    "alibi_causal": (dict(alibi_slopes=slopes, is_causal=True), dict(slopes=slopes, causal=True)),
    "soft_cap": (dict(logits_soft_cap=0.7), dict(cap=0.7)),
    "sinks": (dict(sinks=sinks), dict(sinks=sinks)),
    "everything": (
      dict(
        q_segment_ids=seg,
        q_positions=pos,
        is_causal=True,
        attention_chunk_size=4,
        alibi_slopes=slopes,
        logits_soft_cap=2.0,
        sinks=sinks,
      ),
      dict(seg=seg, pos=pos, causal=True, chunk=4, slopes=slopes, cap=2.0, sinks=sinks),
    ),
  }


VARIANTS = list(variants(None, None))
PATHS = [dict(implementation="naive"), dict(implementation="blockwise", block_q=4, block_kv=4)]


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_matches_the_definition_on_every_path_in_every_ad_mode(problem, name):
  q, k, v, seg, pos = problem
  opts, ref_opts = variants(seg, pos)[name]
  want, want_lse = reference(q, k, v, **ref_opts)
  cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(want.shape), jnp.float32)
  tangents = [
    jnp.asarray(np.random.default_rng(i).standard_normal(x.shape), jnp.float32)
    for i, x in enumerate((q, k, v))
  ]
  ref = lambda q, k, v: reference(q, k, v, **ref_opts)[0]  # noqa: E731
  want_grads = jax.vjp(ref, q, k, v)[1](cotangent)
  want_jvp = jax.jvp(ref, (q, k, v), tuple(tangents))[1]
  for path in PATHS:

    def attend(q, k, v, path=path):
      return jattn.dot_product_attention(q, k, v, **opts, **path)

    out, lse = jattn.dot_product_attention(q, k, v, return_lse=True, **opts, **path)
    assert_allclose(out, want, rtol=1e-5, atol=2e-6, err_msg=str(path))
    assert_allclose(lse, want_lse, rtol=1e-5, atol=2e-6, err_msg=str(path))
    for got, exp in zip(jax.vjp(attend, q, k, v)[1](cotangent), want_grads, strict=True):
      assert_allclose(got, exp, rtol=1e-4, atol=2e-5, err_msg=str(path))
    assert_allclose(
      jax.jvp(attend, (q, k, v), tuple(tangents))[1],
      want_jvp,
      rtol=1e-4,
      atol=2e-5,
      err_msg=str(path),
    )


@pytest.mark.parametrize("path", PATHS, ids=["naive", "blockwise"])
def test_slopes_and_sinks_are_differentiable_in_both_modes(problem, path):
  q, k, v, seg, _ = problem

  def f(slopes, sinks):
    return jattn.dot_product_attention(
      q, k, v, is_causal=True, q_segment_ids=seg, alibi_slopes=slopes, sinks=sinks, **path
    )

  def g(slopes, sinks):
    return reference(q, k, v, causal=True, seg=seg, slopes=slopes, sinks=sinks)[0]

  args = (jattn.alibi_slopes(N), jnp.array([0.5, -1.0, 2.0, 0.0]))
  d = (jnp.array([0.1, -0.2, 0.3, 0.05]), jnp.array([1.0, 0.5, -0.5, 2.0]))
  assert_allclose(jax.jvp(f, args, d)[1], jax.jvp(g, args, d)[1], rtol=1e-4, atol=1e-5)
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731
  for got, want in zip(
    jax.grad(loss(f), (0, 1))(*args), jax.grad(loss(g), (0, 1))(*args), strict=True
  ):
    assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_check_grads_order_two_through_every_variant():
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    q, k, v = (jnp.asarray(rng.standard_normal((1, 9, 2, 4))) for _ in range(3))
    seg = jnp.array([0, 0, 0, 0, 1, 1, 1, 1, 1])

    def f(q, k, v, slopes, sinks):
      return jattn.dot_product_attention(
        q,
        k,
        v,
        is_causal=True,
        q_segment_ids=seg,
        attention_chunk_size=3,
        alibi_slopes=slopes,
        logits_soft_cap=1.5,
        sinks=sinks,
        implementation="blockwise",
        block_q=4,
        block_kv=4,
      )

    args = (q, k, v, jnp.array([0.3, 0.1]), jnp.array([0.2, -0.4]))
    check_grads(f, args, order=2, modes=("fwd", "rev"), eps=1e-4, atol=1e-4, rtol=1e-4)


def test_tiles_of_other_documents_are_skipped(problem):
  """NaN values in document 1 reach document 0's outputs only if its tiles are visited."""
  q, k, v, _, _ = problem
  seg = jnp.repeat(jnp.arange(3), 8)[None].repeat(B, 0)[:, :T]  # tile-aligned documents
  poisoned = v.at[:, 8:16].set(jnp.nan)
  out = jattn.dot_product_attention(
    q, k, poisoned, q_segment_ids=seg, implementation="blockwise", block_q=8, block_kv=8
  )
  want = reference(q, k, v, seg=seg)[0]
  assert_allclose(out[:, :8], want[:, :8], rtol=1e-5, atol=2e-6)
  assert_allclose(out[:, 16:], want[:, 16:], rtol=1e-5, atol=2e-6)
  assert np.isnan(out[:, 8:16]).all()


@pytest.mark.slow
@settings(max_examples=examples(300))
@given(
  st.lists(st.integers(0, 3), min_size=1, max_size=4),
  st.lists(st.integers(0, 3), min_size=1, max_size=4),
  st.lists(st.integers(-3, 9), min_size=4, max_size=4),
  st.lists(st.integers(-3, 9), min_size=4, max_size=4),
  st.booleans(),
  st.one_of(st.none(), st.integers(1, 4)),
  st.one_of(st.none(), st.tuples(st.integers(0, 3), st.integers(0, 3))),
  st.booleans(),
)
@example([0, 0], [0, 0, 0], [0, 1, 2, 3], [0, 1, 2, 3], True, 4, None, True)  # all full
@example([1, 1], [0, 0], [0, 1, 2, 3], [0, 1, 2, 3], False, None, None, False)  # all hidden
def test_tile_rule_agrees_with_the_element_rule_for_segments_positions_chunks(
  q_seg, kv_seg, q_pos, kv_pos, causal, chunk, window, sort
):
  """FULL iff every element is visible, HIDDEN only if none is, from ranges alone."""
  if sort:
    q_seg, kv_seg, q_pos, kv_pos = (sorted(x) for x in (q_seg, kv_seg, q_pos, kv_pos))
  q_seg, kv_seg = jnp.array(q_seg), jnp.array(kv_seg)
  q_pos, kv_pos = jnp.array(q_pos[: len(q_seg)]), jnp.array(kv_pos[: len(kv_seg)])
  m = _masks.Mask(
    T=30,
    S=30,
    offset=0,
    is_causal=causal,
    window=window,
    q_lengths=None,
    kv_lengths=None,
    dense=None,
    mask_mod=None,
    block_mask=None,
    chunk=chunk,
  )
  q_idx, kv_idx = jnp.arange(len(q_seg))[:, None], jnp.arange(len(kv_seg))[None, :]
  elements = _masks.visible(
    m,
    0,
    0,
    q_idx,
    kv_idx,
    q=_masks.Rows(None, q_seg[:, None], q_pos[:, None]),
    kv=_masks.Rows(None, kv_seg[None, :], kv_pos[None, :]),
    dense=None,
  )
  span = lambda x: (jnp.min(x), jnp.max(x))  # noqa: E731
  state = int(
    _masks.tile_state(
      m,
      0,
      len(q_seg) - 1,
      0,
      len(kv_seg) - 1,
      q_range=span(q_pos),
      kv_range=span(kv_pos),
      q_segments=span(q_seg),
      kv_segments=span(kv_seg),
    )
  )
  assert (state == 2) == bool(elements.all())
  if state == 0:
    assert not elements.any()
  if sort and not causal and chunk is None and window is None and not elements.any():
    assert state == 0  # sorted segments alone: skipping is exact


def test_alibi_slopes_are_the_papers():
  assert_allclose(jattn.alibi_slopes(8), 2.0 ** -np.arange(1, 9), rtol=1e-6)
  assert_allclose(jattn.alibi_slopes(2), [2.0**-4, 2.0**-8], rtol=1e-6)
  # Not a power of two: those of 4, then every other slope of 8.
  assert_allclose(
    jattn.alibi_slopes(6), [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3], rtol=1e-6
  )


def test_sink_gradient_accumulates_in_float32_under_bfloat16():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((4, 512, 2, 16)) for _ in range(3))
  sinks = np.array([0.5, 1.5])

  def sink_grad(q, k, v, sinks, **opts):
    # Every row's term has one sign: no cancellation hides (or fakes) an accumulation error.
    return jax.grad(
      lambda s: jnp.sum(
        jattn.dot_product_attention(q, k, v, is_causal=True, sinks=s, **opts).astype(jnp.float32)
        ** 2
      )
    )(sinks)

  bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, sinks)]
  with jax.enable_x64(True):
    exact = sink_grad(
      *(jnp.asarray(np.asarray(x, np.float32), jnp.float64) for x in bf), implementation="naive"
    )
  for impl in ("naive", "blockwise"):
    got = sink_grad(*bf, implementation=impl)
    assert got.dtype == jnp.bfloat16
    # bfloat16 holds 8 bits: the gradient is exact to its rounding, not to the
    # error of a 2048-term bfloat16 sum.
    assert_allclose(np.asarray(got, np.float32), exact, rtol=2**-8)


def test_sinks_in_weights_lse_and_stats(problem):
  q, k, v, seg, _ = problem
  sinks = jnp.array([0.5, -1.0, 2.0, 30.0])
  opts = dict(is_causal=True, q_segment_ids=seg, sinks=sinks)
  _, weights, lse = jattn.dot_product_attention(
    q, k, v, implementation="naive", return_weights=True, return_lse=True, **opts
  )
  lse_keys = jattn.dot_product_attention(
    q, k, v, is_causal=True, q_segment_ids=seg, implementation="naive", return_lse=True
  )[1]
  # Each row keeps exp(lse_keys - lse) of its weight; the sink takes the rest.
  assert_allclose(weights.sum(-1), jnp.exp(lse_keys - lse), rtol=1e-5)
  assert float(weights[:, 3].sum(-1).max()) < 1e-8  # a sink of 30 takes everything
  assert_allclose(
    jattn.attention_weights(q, k, queries=slice(3, 7), **opts),
    weights[:, :, 3:7],
    rtol=1e-5,
    atol=1e-7,
  )
  stats = jattn.attention_stats(q, k, **opts)
  assert_allclose(stats["lse"], lse, rtol=1e-5)
  p = np.asarray(weights, np.float64)
  p_sink = 1.0 - p.sum(-1)
  with np.errstate(divide="ignore", invalid="ignore"):
    entropy = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), -1) - np.where(
      p_sink > 0, p_sink * np.log(p_sink), 0.0
    )
  assert_allclose(stats["entropy"], entropy, rtol=1e-4, atol=1e-5)
  assert_allclose(stats["max_weight"], p.max(-1), rtol=1e-5, atol=1e-7)


def test_decode_and_modules_take_every_variant(rng):
  F, L = 16, 12
  params = jattn.init(jax.random.key(0), F, 8, num_heads=N, num_kv_heads=K, out_features=F)
  x = jnp.asarray(rng.standard_normal((B, L, F)), jnp.float32)
  seg = jnp.asarray([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3], jnp.int32)
  opts = dict(
    q_segment_ids=seg,
    alibi_slopes=jattn.alibi_slopes(N),
    logits_soft_cap=5.0,
    attention_chunk_size=4,
    sinks=jnp.array([0.0, 1.0, -1.0, 0.5]),
  )
  full = jattn.self_attention(params, x, is_causal=True, **opts)
  cache = jattn.init_cache(params, (B,), max_len=L)
  steps = []
  for t in range(0, L, 3):  # three tokens a step: the new ones' ids, the cache's ids
    extra = dict(opts, q_segment_ids=seg[:, t : t + 3], kv_segment_ids=seg)
    out, cache = jattn.decode_step(params, cache, x[:, t : t + 3], **extra)
    steps.append(out)
  assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-6)

  module_opts = dict(
    is_causal=True, alibi=True, logits_soft_cap=5.0, attention_chunk_size=4, use_bias=False
  )
  want = jattn.self_attention(
    params,
    x,
    is_causal=True,
    q_segment_ids=seg,
    logits_soft_cap=5.0,
    alibi_slopes=jattn.alibi_slopes(N),
    attention_chunk_size=4,
  )
  linen = jattn.linen.MultiHeadAttention(num_heads=N, head_dim=8, num_kv_heads=K, **module_opts)
  got = linen.apply({"params": params}, x, q_segment_ids=seg)
  assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  layer = jattn.nnx.MultiHeadAttention(
    N, F, head_dim=8, num_kv_heads=K, rngs=flax_nnx.Rngs(0), **module_opts
  )
  jattn.nnx.set_params(layer, params)
  assert_allclose(layer(x, q_segment_ids=seg), want, rtol=1e-5, atol=1e-6)


def t5_bucket(relative, num_buckets=8, max_distance=32):
  """T5's bidirectional relative-position bucket of ``kv_idx - q_idx`` (Raffel et al., 2020)."""
  half = num_buckets // 2
  bucket = jnp.where(relative > 0, half, 0)
  n = jnp.abs(relative)
  exact = half // 2
  large = exact + (
    jnp.log(jnp.maximum(n, 1) / exact) / np.log(max_distance / exact) * (half - exact)
  ).astype(jnp.int32)
  return bucket + jnp.where(n < exact, n, jnp.minimum(large, half - 1))


@pytest.mark.slow
def test_a_learned_t5_relative_bias_trains_with_optax(problem):
  """A bucketed relative-position bias table as a ``score_mod``, learned with Optax."""
  q, k, v, _, _ = problem

  def attend(table, implementation="blockwise"):
    def score_mod(s, b, h, q_idx, kv_idx):
      return s + table[h, t5_bucket(kv_idx - q_idx)]

    return jattn.dot_product_attention(
      q, k, v, score_mod=score_mod, is_causal=True, implementation=implementation
    )

  true_table = jnp.asarray(np.random.default_rng(5).standard_normal((N, 8)), jnp.float32)
  target = attend(true_table, "naive")

  def loss(table, implementation="blockwise"):
    return jnp.mean((attend(table, implementation) - target) ** 2)

  table = jnp.zeros((N, 8))
  grads = jax.grad(loss)(table)
  assert_allclose(grads, jax.grad(loss)(table, "naive"), rtol=1e-4, atol=1e-7)
  idx = jnp.arange(T)
  relative = (idx[None, :] - idx[:, None])[np.tril_indices(T)]  # the causal pairs
  used = np.isin(np.arange(8), np.asarray(t5_bucket(relative)))  # buckets 0-3: the past
  assert_array_equal(np.asarray(grads != 0), np.broadcast_to(used, grads.shape))
  optimizer = optax.adam(0.1)
  state = optimizer.init(table)
  step = jax.jit(lambda t, s: optimizer.update(jax.grad(loss)(t), s))
  start = float(loss(table))
  for _ in range(100):
    updates, state = step(table, state)
    table = optax.apply_updates(table, updates)
  assert float(loss(table)) < start / 100


def test_variant_errors_name_the_argument(problem):
  q, k, v, seg, pos = problem
  attend = lambda **o: jattn.dot_product_attention(q, k, v, **o)  # noqa: E731
  with pytest.raises(TypeError, match="q_segment_ids must be integers"):
    attend(q_segment_ids=seg.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"kv_segment_ids must have shape \(..., 21\)"):
    attend(q_segment_ids=seg, kv_segment_ids=seg[:, :-1])
  with pytest.raises(ValueError, match="q_positions needs kv_positions too"):
    jattn.dot_product_attention(q, k[:, :-1], v[:, :-1], q_positions=pos)
  with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(N,\)"):
    attend(alibi_slopes=jnp.ones(3))
  with pytest.raises(TypeError, match="alibi_slopes must be floating"):
    attend(alibi_slopes=jnp.ones(4, jnp.int32))
  with pytest.raises(ValueError, match=r"sinks must have shape \(N,\)"):
    attend(sinks=jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="logits_soft_cap must be positive"):
    attend(logits_soft_cap=0.0)
  with pytest.raises(TypeError, match="logits_soft_cap must be a positive Python float"):
    jax.jit(lambda c: attend(logits_soft_cap=c))(1.0)
  with pytest.raises(ValueError, match="attention_chunk_size must be positive"):
    attend(attention_chunk_size=0)
  with pytest.raises(TypeError, match="attention_chunk_size must be a Python int"):
    attend(attention_chunk_size=2.5)


def test_packed_documents_equal_separate_calls(problem):
  """Packing is exact: each document attended alone gives the same rows."""
  q, k, v, seg, pos = problem
  packed = jattn.dot_product_attention(
    q,
    k,
    v,
    q_segment_ids=seg,
    q_positions=pos,
    is_causal=True,
    alibi_slopes=jattn.alibi_slopes(N),
    implementation="blockwise",
    block_q=4,
    block_kv=4,
  )
  for b in range(B):
    for d in np.unique(np.asarray(seg[b])):
      rows = np.flatnonzero(np.asarray(seg[b]) == d)
      alone = jattn.dot_product_attention(
        q[b, rows], k[b, rows], v[b, rows], is_causal=True, alibi_slopes=jattn.alibi_slopes(N)
      )
      assert_allclose(packed[b, rows], alone, rtol=1e-5, atol=1e-6)
  assert_array_equal(jnp.isfinite(packed), True)


def test_learnable_sinks_live_in_the_params_of_every_layer(rng):
  F, L = 16, 6
  params = jattn.init(
    jax.random.key(0), F, 8, num_heads=N, num_kv_heads=K, out_features=F, use_sinks=True
  )
  assert_array_equal(params["sinks"], jnp.zeros(N))
  params["sinks"] = jnp.array([0.5, -1.0, 2.0, 0.0])
  x = jnp.asarray(rng.standard_normal((B, L, F)), jnp.float32)
  bare = {name: entry for name, entry in params.items() if name != "sinks"}
  want = jattn.self_attention(bare, x, is_causal=True, sinks=params["sinks"])
  assert_allclose(jattn.self_attention(params, x, is_causal=True), want, rtol=1e-6)
  assert float(jnp.abs(want - jattn.self_attention(bare, x, is_causal=True)).max()) > 1e-2
  steps = jattn.explain(params, x, is_causal=True)
  assert float(steps["weights"].sum(-1).max()) < 1.0  # the sinks take their share
  assert_allclose(steps["outputs"], want, rtol=1e-5, atol=1e-6)
  cache = jattn.init_cache(params, (B,), max_len=L)
  out, _ = jattn.decode_step(params, cache, x)
  assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  # The sinks learn: their gradient is that of the sinks option.
  grad = jax.grad(lambda p: jnp.sum(jattn.self_attention(p, x, is_causal=True) ** 2))(params)
  want_grad = jax.grad(
    lambda s: jnp.sum(jattn.self_attention(bare, x, is_causal=True, sinks=s) ** 2)
  )(params["sinks"])
  assert_allclose(grad["sinks"], want_grad, rtol=1e-5)
  with pytest.raises(ValueError, match="do not pass sinks= as well"):
    jattn.self_attention(params, x, sinks=params["sinks"])
  with pytest.raises(ValueError, match=r"params\['sinks'\] must be \(4,\) floats"):
    jattn.self_attention({**params, "sinks": jnp.zeros(3)}, x)

  module = jattn.linen.MultiHeadAttention(
    num_heads=N, head_dim=8, num_kv_heads=K, use_sinks=True, use_bias=False, is_causal=True
  )
  variables = module.init(jax.random.key(1), x)
  assert variables["params"]["sinks"].shape == (N,)
  assert_allclose(module.apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)
  layer = jattn.nnx.MultiHeadAttention(
    N,
    F,
    head_dim=8,
    num_kv_heads=K,
    use_sinks=True,
    use_bias=False,
    is_causal=True,
    rngs=flax_nnx.Rngs(0),
  )
  jattn.nnx.set_params(layer, params)
  assert_allclose(layer(x), want, rtol=1e-5, atol=1e-6)
