"""Programmable attention: score_mod / mask_mod / block_mask on every path and in every AD mode.

The reference here is written from the definition, with explicit index grids and
no jattn code: scores ``s[b, h, t, s] = scale * q . k + bias``, then
``score_mod(s, b, h, t, s)``, then the mask ``mask_mod(b, h, t, s)`` (and the
built-in rules), a softmax, the weighted sum of the values.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
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


def reference(q, k, v, *, score_mod=None, mask_mod=None, is_causal=False, kv_lengths=None):
  """Attention from the definition (top-left == bottom-right here: T == S or not causal)."""
  *batch, T, N, H = q.shape
  S, K = k.shape[-3:-1]
  B = int(np.prod(batch, dtype=int))
  qf = q.reshape(B, T, N, H)
  kf = jnp.repeat(k.reshape(B, S, K, H), N // K, axis=2)
  vf = jnp.repeat(v.reshape(B, S, K, -1), N // K, axis=2)
  s = jnp.einsum("btnh,bsnh->bnts", qf, kf) / np.sqrt(H)
  b, h, t, j = jnp.meshgrid(
    jnp.arange(B), jnp.arange(N), jnp.arange(T), jnp.arange(S), indexing="ij"
  )
  if score_mod is not None:
    s = score_mod(s, b, h, t, j)
  visible = jnp.ones(s.shape, bool)
  if mask_mod is not None:
    visible &= mask_mod(b, h, t, j)
  if is_causal:
    visible &= j <= t + (S - T)
  if kv_lengths is not None:
    visible &= j < jnp.asarray(kv_lengths).reshape(B, 1, 1, 1)
  s = jnp.where(visible, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(visible, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  w = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  out = jnp.einsum("bnts,bsnd->btnd", w, vf)
  return out.reshape(*batch, T, N, -1)


def make_mods(table, doc_q, doc_kv, cap):
  """A soft cap, a per-head relative-position bias table, and same-document masking."""
  R = table.shape[-1] // 2

  def score_mod(s, b, h, q_idx, kv_idx):
    s = cap * jnp.tanh(s / cap)
    return s + table[h, jnp.clip(q_idx - kv_idx, -R, R) + R]

  def mask_mod(b, h, q_idx, kv_idx):
    return doc_q[b, q_idx] == doc_kv[b, kv_idx]

  return score_mod, mask_mod


def data(seed, batch, T, S, N, K, H=4, D=3, docs=2):
  r = np.random.default_rng(seed)
  B = int(np.prod(batch, dtype=int))
  q, k, v = (
    jnp.asarray(r.standard_normal(shape), jnp.float32)
    for shape in ((*batch, T, N, H), (*batch, S, K, H), (*batch, S, K, D))
  )
  table = jnp.asarray(r.standard_normal((N, 2 * 3 + 1)), jnp.float32)
  doc_q = jnp.asarray(np.sort(r.integers(0, docs, (B, T)), axis=-1), jnp.int32)
  doc_kv = jnp.asarray(np.sort(r.integers(0, docs, (B, S)), axis=-1), jnp.int32)
  return q, k, v, table, doc_q, doc_kv


@st.composite
def problems(draw):
  batch = draw(st.sampled_from([(), (2,), (2, 1)]))
  T, S = draw(st.integers(1, 11)), draw(st.integers(1, 11))
  K, G = draw(st.integers(1, 2)), draw(st.integers(1, 2))
  blocks = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
  flags = {n: draw(st.booleans()) for n in ("score", "mask", "causal", "lengths")}
  return draw(st.integers(0, 2**16)), batch, (T, S, K * G, K), blocks, flags


@pytest.mark.slow
@settings(max_examples=examples(12))
@given(problems())
# GQA, lengths that are not tile multiples, and batch 1 with no key (key length 0: masked rows)
@example((3, (2,), (11, 7, 4, 2), (4, 3), dict(score=True, mask=True, causal=False, lengths=True)))
@example((5, (2, 1), (9, 9, 2, 1), (4, 4), dict(score=True, mask=True, causal=True, lengths=False)))
def test_mods_match_the_definition_on_every_path_with_gradients(problem):
  seed, batch, (T, S, N, K), blocks, flags = problem
  if flags["causal"]:
    S = T  # the reference's causal rule is for T == S or bottom-right
  q, k, v, table, doc_q, doc_kv = data(seed, batch, T, S, N, K)
  B = int(np.prod(batch, dtype=int))
  lengths = np.random.default_rng(seed).integers(0, S + 1, batch) if batch else None
  opts = dict(is_causal=flags["causal"])
  if flags["lengths"] and batch:
    opts["key_value_seq_lengths"] = jnp.asarray(lengths, jnp.int32)

  def mods(table):
    score_mod, mask_mod = make_mods(table, doc_q, doc_kv, 2.0)
    return (score_mod if flags["score"] else None), (mask_mod if flags["mask"] else None)

  def ours(implementation, q, k, v, table):
    score_mod, mask_mod = mods(table)
    return jattn.dot_product_attention(
      q,
      k,
      v,
      score_mod=score_mod,
      mask_mod=mask_mod,
      implementation=implementation,
      block_q=blocks[0],
      block_kv=blocks[1],
      **opts,
    )

  def theirs(q, k, v, table):
    score_mod, mask_mod = mods(table)
    return reference(
      q,
      k,
      v,
      score_mod=score_mod,
      mask_mod=mask_mod,
      is_causal=flags["causal"],
      kv_lengths=opts.get("key_value_seq_lengths"),
    )

  @jax.jit
  def run(q, k, v, table):
    def loss(fn):
      return lambda *a: jnp.sum(jnp.sin(fn(*a)))

    results = []
    for fn in (
      functools.partial(ours, "naive"),
      functools.partial(ours, "blockwise"),
      theirs,
    ):
      results.append((fn(q, k, v, table), jax.grad(loss(fn), argnums=(0, 1, 2, 3))(q, k, v, table)))
    return results

  del B
  naive, blockwise, want = run(q, k, v, table)
  for got in (naive, blockwise):
    assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[1], want[1], strict=True):
      assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.fixture
def problem():
  return data(0, (2,), 9, 9, 4, 2)


def blockwise_and_naive(table_fn):
  """``f(implementation, q, table)``: attention with a mod over ``table``, summed to a scalar."""

  def f(implementation, q, k, v, table):
    out = jattn.dot_product_attention(
      q, k, v, implementation=implementation, block_q=4, block_kv=3, **table_fn(table)
    )
    return jnp.sum(jnp.sin(out))

  return f


def test_gradients_through_captured_arrays_in_every_ad_mode(problem):
  q, k, v, table, doc_q, doc_kv = problem

  def options(table):
    score_mod, mask_mod = make_mods(table, doc_q, doc_kv, 3.0)
    return dict(score_mod=score_mod, mask_mod=mask_mod, is_causal=True)

  f = blockwise_and_naive(options)
  fast = functools.partial(f, "blockwise", q, k, v)
  slow = functools.partial(f, "naive", q, k, v)
  dt = jnp.asarray(np.random.default_rng(1).standard_normal(table.shape), jnp.float32)
  assert_allclose(jax.grad(fast)(table), jax.grad(slow)(table), rtol=1e-5, atol=1e-6)
  assert_allclose(jax.jvp(fast, (table,), (dt,))[1], jax.jvp(slow, (table,), (dt,))[1], rtol=1e-5)
  assert_allclose(jax.jacfwd(fast)(table), jax.jacfwd(slow)(table), rtol=1e-5, atol=1e-6)
  hvp = lambda g: jax.jvp(jax.grad(g), (table,), (dt,))[1]  # noqa: E731
  assert_allclose(hvp(fast), hvp(slow), rtol=1e-4, atol=1e-5)
  # Deterministic run to run: the transposed sweep accumulates, never races.
  assert_array_equal(jax.jit(jax.grad(fast))(table), jax.jit(jax.grad(fast))(table))


@pytest.mark.slow
def test_check_grads_order_two_with_a_captured_table():
  q, k, v, table, doc_q, doc_kv = data(3, (), 5, 6, 2, 1)

  def f(q, k, v, table):
    score_mod, _ = make_mods(jnp.asarray(table), doc_q, doc_kv, 2.0)
    return jattn.dot_product_attention(
      q, k, v, score_mod=score_mod, implementation="blockwise", block_q=2, block_kv=4
    )

  with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(a), jnp.float64) for a in (q, k, v, table)]
    check_grads(f, args, order=2, modes=("fwd", "rev"), eps=1e-4, atol=1e-4, rtol=1e-4)


def test_traced_mods_do_not_recompile_when_captured_values_change(problem):
  q, k, v, table, doc_q, _ = problem
  traces = []

  @jax.jit
  def step(table, doc_q):
    traces.append(1)
    score_mod, mask_mod = make_mods(table, doc_q, doc_q, 3.0)
    return jattn.dot_product_attention(
      q, k, v, score_mod=score_mod, mask_mod=mask_mod, implementation="blockwise"
    )

  first = step(table, doc_q)
  second = step(2.0 * table, jnp.roll(doc_q, 3, axis=-1))
  assert len(traces) == 1
  assert not np.allclose(first, second)


def test_mods_compose_with_masks_bias_lengths_windows_gqa_dropout_lse_and_stats(problem):
  q, k, v, table, doc_q, doc_kv = problem
  r = np.random.default_rng(2)
  score_mod, mask_mod = make_mods(table, doc_q, doc_kv, 2.5)
  opts = dict(
    score_mod=score_mod,
    mask_mod=mask_mod,
    mask=jnp.asarray(r.random((2, 1, 9, 9)) > 0.2),
    bias=jnp.asarray(r.standard_normal((4, 9, 9)), jnp.float32),
    key_value_seq_lengths=jnp.array([9, 6]),
    query_seq_lengths=jnp.array([7, 9]),
    local_window_size=(4, 1),
    dropout_rate=0.3,
    dropout_rng=jax.random.key(0),
  )
  naive = jattn.dot_product_attention(q, k, v, implementation="naive", return_lse=True, **opts)
  block = jattn.dot_product_attention(
    q, k, v, implementation="blockwise", block_q=2, block_kv=4, return_lse=True, **opts
  )
  assert_allclose(block[0], naive[0], rtol=1e-5, atol=1e-6)
  assert_allclose(block[1], naive[1], rtol=1e-5, atol=1e-6)
  no_dropout = {n: o for n, o in opts.items() if not n.startswith("dropout")}
  stats = jattn.attention_stats(q, k, block_q=3, block_kv=2, **no_dropout)
  weights = jattn.attention_weights(q, k, **no_dropout)
  assert_allclose(stats["lse"], naive[1], rtol=1e-5, atol=1e-6)
  assert_allclose(stats["max_weight"], weights.max(-1), rtol=1e-5, atol=1e-6)
  # The reference with the same dense rules written out: bias, mask, lengths, window.
  ref_w = jattn.dot_product_attention(
    q, k, v, implementation="naive", return_weights=True, **no_dropout
  )[1]
  assert_allclose(weights, ref_w, rtol=1e-5, atol=1e-6)


def test_self_attention_decode_and_modules_take_mods():
  params = jattn.init(jax.random.key(0), 6, 4, num_heads=2)
  x = jax.random.normal(jax.random.key(1), (7, 6))
  slopes = jnp.array([0.5, 0.25])

  def alibi(s, b, h, q_idx, kv_idx):
    return s - slopes[h] * jnp.abs(q_idx - kv_idx)

  full = jattn.self_attention(params, x, score_mod=alibi, is_causal=True)
  cache = jattn.init_cache(params, (), 7)
  outs = []
  for t in range(7):  # decode sees positions as q_idx: the same mod works token by token
    out, cache = jattn.decode_step(params, cache, x[t : t + 1], score_mod=alibi)
    outs.append(out)
  assert_allclose(jnp.concatenate(outs), full, rtol=1e-5, atol=1e-6)
  by_mask = jattn.self_attention(
    params, x, score_mod=alibi, mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx
  )
  assert_allclose(by_mask, full, rtol=1e-5, atol=1e-6)
  linen = jattn.linen.MultiHeadAttention(
    num_heads=2, head_dim=4, use_out_projection=False, use_bias=False, is_causal=True
  )
  assert_allclose(linen.apply({"params": params}, x, score_mod=alibi), full, rtol=1e-5, atol=1e-6)
  layer = jattn.nnx.MultiHeadAttention(
    2, 6, head_dim=4, use_out_projection=False, use_bias=False, is_causal=True,
    rngs=flax_nnx.Rngs(0),
  )  # fmt: skip
  jattn.nnx.set_params(layer, params)
  assert_allclose(layer(x, score_mod=alibi), full, rtol=1e-5, atol=1e-6)


# --- tile maps and tile skipping ---------------------------------------------------------------


def documents(T, n):
  doc = jnp.arange(T) // (T // n)
  return lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx]


def test_block_mask_tiles_are_the_mask_reduced_per_tile():
  T, S, bq, bk = 13, 11, 4, 3
  r = np.random.default_rng(0)
  table = jnp.asarray(r.random((2, 3, T, S)) > 0.6)  # (batch, heads, T, S)
  mask_mod = lambda b, h, q_idx, kv_idx: table[b, h, q_idx, kv_idx]  # noqa: E731
  bm = jattn.block_mask(mask_mod, T, S, batch_shape=(2,), num_heads=3, block_q=bq, block_kv=bk)
  assert bm.tiles.shape == (2, 3, 4, 4)
  padded = np.pad(
    np.asarray(table, int), ((0, 0), (0, 0), (0, 16 - T), (0, 12 - S)), constant_values=-1
  )
  tiles = padded.reshape(2, 3, 4, bq, 4, bk).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 4, 4, -1)
  inside = tiles >= 0
  want = np.where((tiles == 1).any(-1), np.where(((tiles == 1) | ~inside).all(-1), 2, 1), 0)
  assert_array_equal(bm.tiles, want)
  q, k, v = (jax.random.normal(jax.random.key(i), (2, n, 3, 4)) for i, n in enumerate((T, S, S)))
  with_map = jattn.dot_product_attention(
    q, k, v, mask_mod=mask_mod, block_mask=bm, implementation="blockwise"
  )
  naive = jattn.dot_product_attention(q, k, v, mask=table, implementation="naive")
  assert_allclose(with_map, naive, rtol=1e-5, atol=1e-6)


def test_tiles_the_map_hides_are_skipped_and_full_tiles_are_not_masked():
  """A map that lies shows what the kernel does with it: hidden tiles are never visited,
  and full tiles are taken whole, without the per-element mask."""
  T, bq = 8, 4
  mask_mod = documents(T, 2)  # two documents: tiles (0, 0) and (1, 1) full, the rest hidden
  honest = jattn.block_mask(mask_mod, T, block_q=bq, block_kv=bq)
  assert_array_equal(honest.tiles[0, 0], [[2, 0], [0, 2]])
  q, k, v = (jax.random.normal(jax.random.key(i), (T, 1, 4)) for i in range(3))
  attend = functools.partial(
    jattn.dot_product_attention, q, k, v, mask_mod=mask_mod, implementation="blockwise"
  )
  naive = jattn.dot_product_attention(q, k, v, mask_mod=mask_mod, implementation="naive")
  assert_allclose(attend(block_mask=honest), naive, rtol=1e-5, atol=1e-6)
  skip_all_of_doc_1 = jattn.BlockMask(jnp.array([[[[2, 0], [0, 0]]]], jnp.int8), T, T, bq, bq)
  out = attend(block_mask=skip_all_of_doc_1)
  assert_allclose(out[:bq], naive[:bq], rtol=1e-5, atol=1e-6)
  assert_array_equal(out[bq:], 0.0)  # its tile was skipped: nothing attended
  everything_full = jattn.BlockMask(jnp.full((1, 1, 2, 2), 2, jnp.int8), T, T, bq, bq)
  unmasked = jattn.dot_product_attention(q, k, v, implementation="naive")
  assert_allclose(attend(block_mask=everything_full), unmasked, rtol=1e-5, atol=1e-6)


def test_block_mask_never_builds_the_whole_mask():
  """XLA's temporaries for ``block_mask`` grow with T (one row of tiles at a time), not T * S:
  at 16,384 tokens they are a small fraction of the (T, S) boolean mask's 268 MB."""

  def temp_bytes(T):
    same_document = lambda b, h, q_idx, kv_idx: q_idx // 512 == kv_idx // 512  # noqa: E731
    build = jax.jit(lambda: jattn.block_mask(same_document, T, block_q=256, block_kv=256).tiles)
    return build.lower().compile().memory_analysis().temp_size_in_bytes

  small, large = temp_bytes(4096), temp_bytes(16384)
  assert large < 16384 * 16384 / 16  # measured 8.5 MB against 268 MB
  assert large < 4.5 * small  # 4x the tokens: 4x the memory (measured 4.0x), not 16x


@pytest.mark.slow
@settings(max_examples=examples(300))
@given(
  st.integers(0, 8),
  st.integers(0, 8),
  st.integers(1, 4),
  st.integers(1, 4),
  st.booleans(),
  st.one_of(st.none(), st.tuples(st.integers(0, 3), st.integers(0, 3))),
  st.integers(-2, 2),
  st.one_of(st.none(), st.integers(0, 10)),
)
def test_built_in_tile_rule_agrees_with_the_element_rule(
  q_first, kv_first, q_size, kv_size, causal, window, offset, kv_len
):
  """FULL iff every element of the tile is visible; HIDDEN only if none is, and whenever none
  is under a single rule (rules combine by AND, so two rules may leave a tile PARTIAL that
  no element of survives: correct, merely not skipped)."""
  m = _masks.Mask(
    T=30,
    S=30,
    offset=offset,
    is_causal=causal,
    window=window,
    q_lengths=None,
    kv_lengths=None,
    dense=None,
    mask_mod=None,
    block_mask=None,
  )
  q = jnp.arange(q_first, q_first + q_size)[:, None]
  kv = jnp.arange(kv_first, kv_first + kv_size)[None, :]
  elements = _masks.visible(m, 0, 0, q, kv, q=_masks.Rows(), kv=_masks.Rows(kv_len), dense=None)
  elements = jnp.ones((q_size, kv_size), bool) if elements is None else elements
  state = _masks.tile_state(
    m, q_first, q_first + q_size - 1, kv_first, kv_first + kv_size - 1, kv_len=kv_len
  )
  assert (int(state) == 2) == bool(elements.all())
  if int(state) == 0:
    assert not elements.any()
  if causal + (window is not None) + (kv_len is not None) == 1 and not elements.any():
    assert int(state) == 0


def compiled_temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("mode", ["grad", "jvp", "hvp"])
def test_memory_with_a_mod_grows_linearly(mode):
  table = jax.ShapeDtypeStruct((2, 65), jnp.float32)

  def measure(T):
    x = jax.ShapeDtypeStruct((1, T, 2, 32), jnp.float32)

    def loss(q, table):
      def score_mod(s, b, h, q_idx, kv_idx):
        return s + table[h, jnp.clip(q_idx - kv_idx, -32, 32) + 32]

      out = jattn.dot_product_attention(
        q, q, q, score_mod=score_mod, is_causal=True, implementation="blockwise"
      )
      return jnp.sum(out**2)

    if mode == "grad":
      fn = jax.grad(loss, argnums=(0, 1))
    elif mode == "jvp":
      fn = lambda q, t: jax.jvp(loss, (q, t), (q, t))  # noqa: E731
    else:
      fn = lambda q, t: jax.jvp(jax.grad(loss, argnums=1), (q, t), (q, t))[1]  # noqa: E731
    return compiled_temp_bytes(fn, x, table)

  scores_bytes = 2 * 4096 * 4096 * 4
  small, large = measure(4096), measure(8192)
  assert small < scores_bytes / 4
  assert large < 2.5 * small  # linear in T, not 4x


# --- bad input -----------------------------------------------------------------------------------


def test_mod_errors_name_the_argument(problem):
  q, k, v, *_ = problem
  attend = functools.partial(jattn.dot_product_attention, q, k, v)
  with pytest.raises(TypeError, match="mask_mod must return a bool"):
    attend(mask_mod=lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).astype(jnp.float32))
  with pytest.raises(ValueError, match=r"mask_mod must return one scalar.*\(2,\)"):
    attend(mask_mod=lambda b, h, q_idx, kv_idx: jnp.array([True, False]))
  with pytest.raises(TypeError, match="score_mod must return a floating score"):
    attend(score_mod=lambda s, b, h, q_idx, kv_idx: q_idx)
  with pytest.raises(ValueError, match="score_mod must return one scalar"):
    attend(score_mod=lambda s, b, h, q_idx, kv_idx: jnp.stack([s, s]))
  with pytest.raises(TypeError, match="score_mod must be a callable"):
    attend(score_mod=3.0)
  with pytest.raises(TypeError, match=r"mask_mod must be a function \(b, h, q_idx, kv_idx\)"):
    attend(mask_mod=lambda b, h, q_idx, kv_idx: True if q_idx > kv_idx else False)
  bm = jattn.block_mask(documents(8, 2), 8, block_q=4, block_kv=4)
  with pytest.raises(ValueError, match=r"block_mask was built for \(q_len, kv_len\) = \(8, 8\)"):
    attend(mask_mod=documents(8, 2), block_mask=bm)
  bm = jattn.block_mask(documents(9, 3), 9, block_q=4, block_kv=4)
  with pytest.raises(ValueError, match=r"block_q=2 differs from the block_mask's tiles"):
    attend(mask_mod=documents(9, 3), block_mask=bm, block_q=2)
  with pytest.raises(ValueError, match=r"block_mask needs the mask_mod"):
    attend(block_mask=bm)
  with pytest.raises(TypeError, match=r"block_mask must come from jattn\.block_mask"):
    attend(mask_mod=documents(9, 3), block_mask=np.ones((1, 1, 3, 3)))
  with pytest.raises(TypeError, match=r"unknown option\(s\) \['mask_fn'\]"):
    attend(mask_fn=documents(9, 3))


@pytest.mark.parametrize("implementation", ["naive", "blockwise"])
def test_numpy_bools_are_flags_on_every_path(problem, implementation):
  q, k, v, *_ = problem
  want = jattn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
  got = jattn.dot_product_attention(q, k, v, is_causal=np.True_, implementation=implementation)
  assert_array_equal(got, want)
  stats = jattn.attention_stats(q, k, is_causal=np.True_)
  assert_allclose(stats["lse"], jattn.attention_stats(q, k, is_causal=True)["lse"])
  with pytest.raises(TypeError, match="is_causal must be a Python bool"):
    jattn.dot_product_attention(q, k, v, is_causal=1, implementation=implementation)
