"""The blockwise path equals the naive one in value and in every AD mode, in O(N) memory."""

import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import examples, normal
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from numpy.testing import assert_allclose, assert_array_equal

import jattn

naive = functools.partial(jattn.dot_product_attention, implementation="naive")


def blockwise(block_q, block_kv):
  return functools.partial(
    jattn.dot_product_attention, implementation="blockwise", block_q=block_q, block_kv=block_kv
  )


def make_problem(
  batch,
  T,
  S,
  K,
  G,
  H,
  D,
  seed,
  *,
  is_causal=False,
  window=None,
  mask=False,
  bias=False,
  kv_lengths=False,
  q_lengths=False,
  alignment="bottom_right",
  blocks=(1, 1),
):
  """One problem ``((q, k, v), opts, blocks)``: arrays drawn from ``seed``, options as given.

  ``mask``, ``bias``, ``kv_lengths`` and ``q_lengths`` are False (absent), True (drawn
  from ``seed``) or the values themselves.
  """
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((*batch, T, K * G, H))
  k = rng.standard_normal((*batch, S, K, H))
  v = rng.standard_normal((*batch, S, K, D))
  opts = {}
  if is_causal:
    opts["is_causal"] = True
  if window is not None:
    opts["local_window_size"] = window
  if mask is True:
    mask = rng.random((*batch, 1, T, S)) > 0.3
  if mask is not False:
    opts["mask"] = np.asarray(mask)
  if bias is True:
    bias = rng.standard_normal((K * G, T, S))
  if bias is not False:
    opts["bias"] = np.asarray(bias)
  if kv_lengths is True:
    kv_lengths = rng.integers(0, S + 1, batch)
  if kv_lengths is not False:
    opts["key_value_seq_lengths"] = np.asarray(kv_lengths, np.int32)
  if q_lengths is True:
    q_lengths = rng.integers(0, T + 1, batch)
  if q_lengths is not False:
    opts["query_seq_lengths"] = np.asarray(q_lengths, np.int32)
  opts["alignment"] = alignment
  return (q, k, v), opts, blocks


@st.composite
def problems(draw):
  """Shapes, options and block sizes, including lengths that are not block multiples."""
  batch = draw(st.sampled_from([(), (2,), (2, 1)]))
  T, S = draw(st.integers(1, 13)), draw(st.integers(1, 13))
  K, G = draw(st.integers(1, 2)), draw(st.integers(1, 2))
  H, D = draw(st.integers(1, 4)), draw(st.integers(1, 3))
  seed = draw(st.integers(0, 2**32 - 1))
  options = dict(
    is_causal=draw(st.booleans()),
    window=(draw(st.integers(0, 4)), draw(st.integers(0, 4))) if draw(st.booleans()) else None,
    mask=draw(st.booleans()),
    bias=draw(st.booleans()),
    kv_lengths=bool(batch) and draw(st.booleans()),
    q_lengths=bool(batch) and draw(st.booleans()),
    alignment=draw(st.sampled_from(["bottom_right", "top_left"])),
    blocks=(draw(st.integers(1, 8)), draw(st.integers(1, 8))),
  )
  return make_problem(batch, T, S, K, G, H, D, seed, **options)


def row_off(batch, T, S, row):
  """A full-rank mask ``(*batch, 1, T, S)`` that hides every key from query ``row``."""
  mask = np.ones((*batch, 1, T, S), bool)
  mask[..., row, :] = False
  return mask


# Edge cases every run checks besides the drawn ones: (batch, T, S, K, G, H, D, seed, ...).
EDGE_CASES = [
  # Lengths that are not block multiples; grouped heads; a batch element with no keys.
  make_problem((2,), 13, 11, 2, 2, 3, 2, 0, is_causal=True, kv_lengths=(0, 7), blocks=(4, 3)),
  # A query row the mask hides entirely; fewer queries in one batch element.
  make_problem(
    (2,), 7, 9, 1, 2, 2, 3, 1, mask=row_off((2,), 7, 9, 3), q_lengths=(7, 4), blocks=(3, 4)
  ),
  # Windows with T != S, in both alignments.
  make_problem((), 5, 11, 2, 1, 3, 2, 2, window=(2, 1), blocks=(2, 4)),
  make_problem((2,), 11, 5, 1, 2, 2, 2, 3, window=(1, 3), alignment="top_left", blocks=(3, 2)),
]


def with_edge_cases(test):
  for problem in reversed(EDGE_CASES):
    test = example(problem)(test)
  return test


ARRAY_OPTIONS = ("mask", "bias", "key_value_seq_lengths", "query_seq_lengths")


def jitted_comparison(problem, dtype, compare):
  """Runs ``compare(fast, slow, q, k, v, opts)`` as one jitted program per drawn problem.

  One compilation per example instead of one per eager operation keeps the
  hypothesis tests fast.
  """
  (q, k, v), opts, blocks = problem
  arrays = {n: opts[n] for n in ARRAY_OPTIONS if n in opts}
  if "bias" in arrays:
    arrays["bias"] = jnp.asarray(arrays["bias"], dtype)
  static = {n: o for n, o in opts.items() if n not in ARRAY_OPTIONS}

  @jax.jit
  def run(q, k, v, arrays):
    return compare(blockwise(*blocks), naive, q, k, v, {**static, **arrays})

  return run(*(jnp.asarray(a, dtype) for a in (q, k, v)), arrays)


def compare_float32(fast, slow, q, k, v, opts):
  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v, **opts)))

  return [
    (
      fn(q, k, v, return_lse=True, **opts),
      jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2))(q, k, v),
    )
    for fn in (fast, slow)
  ]


@pytest.mark.slow
@settings(max_examples=examples(14))
@with_edge_cases
@given(problems())
def test_blockwise_equals_naive_outputs_lse_and_gradients_float32(problem):
  fast, slow = jitted_comparison(problem, jnp.float32, compare_float32)
  (out_b, lse_b), grads_b = fast
  (out_n, lse_n), grads_n = slow
  assert_allclose(out_b, out_n, atol=1e-5, rtol=1e-5)
  assert_array_equal(np.isinf(lse_b), np.isinf(lse_n))
  finite = np.isfinite(lse_n)
  assert_allclose(np.asarray(lse_b)[finite], np.asarray(lse_n)[finite], atol=1e-5, rtol=1e-5)
  for g_b, g_n in zip(grads_b, grads_n, strict=True):
    assert_allclose(g_b, g_n, atol=1e-5, rtol=1e-4)


def compare_float64(fast, slow, q, k, v, opts):
  tangents = tuple(jnp.cos(a) for a in (q, k, v))
  results = []
  for fn in (fast, slow):
    out, jvp = jax.jvp(lambda *a, fn=fn: fn(*a, **opts), (q, k, v), tangents)
    bias_grad = None
    if "bias" in opts:  # the bias is differentiable too
      bias_grad = jax.grad(lambda b, fn=fn: jnp.sum(fn(q, k, v, **dict(opts, bias=b)) ** 2))(
        opts["bias"]
      )
    results.append((out, jvp, bias_grad))
  return results


@pytest.mark.slow
@settings(max_examples=examples(8))
@with_edge_cases
@given(problems())
def test_blockwise_equals_naive_float64_forward_and_reverse(problem):
  with jax.enable_x64(True):
    fast, slow = jitted_comparison(problem, jnp.float64, compare_float64)
  for a, b in zip(fast, slow, strict=True):
    if a is not None:
      assert_allclose(a, b, atol=1e-11, rtol=1e-11)


@pytest.mark.slow
@pytest.mark.parametrize(
  "opts",
  [{}, dict(is_causal=True), dict(local_window_size=(2, 1), key_value_seq_lengths="lengths")],
  ids=["plain", "causal", "window+lengths"],
)
def test_check_grads_order_two_forward_and_reverse(rng, opts):
  with jax.enable_x64(True):
    q = normal(rng, (2, 7, 4, 3), np.float64)
    k = normal(rng, (2, 7, 2, 3), np.float64)
    v = normal(rng, (2, 7, 2, 2), np.float64)
    if "key_value_seq_lengths" in opts:
      opts = dict(opts, key_value_seq_lengths=np.array([5, 7], np.int32))
    fn = jax.jit(functools.partial(blockwise(3, 2), **opts))
    check_grads(fn, (q, k, v), order=2, modes=("fwd", "rev"))


@pytest.mark.slow
def test_hessian_vector_product_and_jacfwd_match_naive(rng):
  with jax.enable_x64(True):
    q, k, v = (normal(rng, (6, 2, 3), np.float64) for _ in range(3))
    fast = blockwise(4, 4)

    def loss(fn, q):
      return jnp.sum(fn(q, k, v, is_causal=True) ** 3)

    direction = normal(rng, q.shape, np.float64)
    hvps = [
      jax.jvp(jax.grad(functools.partial(loss, fn)), (q,), (direction,))[1] for fn in (fast, naive)
    ]
    assert_allclose(*hvps, rtol=1e-10, atol=1e-12)
    jacs = [jax.jacfwd(lambda q, fn=fn: fn(q, k, v))(q) for fn in (fast, naive)]
    assert_allclose(*jacs, rtol=1e-10, atol=1e-12)


def test_fully_masked_rows_as_in_the_naive_path(rng):
  q, k, v = normal(rng, (2, 5, 2, 4)), normal(rng, (2, 6, 2, 4)), normal(rng, (2, 6, 2, 4))
  mask = np.ones((2, 2, 5, 6), bool)
  mask[:, :, 2] = False
  fast = blockwise(2, 4)
  out, lse = fast(q, k, v, mask=mask, return_lse=True)
  assert_array_equal(out[:, 2], 0.0)
  assert np.all(np.isneginf(lse[:, :, 2]))
  grads = jax.grad(lambda q, k, v: jnp.sum(fast(q, k, v, mask=mask) ** 2), argnums=(0, 1, 2))(
    q, k, v
  )
  for g in grads:
    assert np.all(np.isfinite(g))
  assert_array_equal(grads[0][:, 2], 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_outputs_and_gradients_keep_their_dtype(rng, dtype):
  """Outputs and gradients in the input dtype, close to float32's (the float32 accumulation
  itself, to one ulp, is tests/test_precision.py's)."""
  q, k, v = (jnp.asarray(normal(rng, (2, 40, 2, 16)), dtype) for _ in range(3))
  out = blockwise(16, 16)(q, k, v, is_causal=True)
  assert out.dtype == dtype
  reference = naive(*(a.astype(jnp.float32) for a in (q, k, v)), is_causal=True)
  assert_allclose(np.asarray(out, np.float32), reference, atol=2e-2)
  grad = jax.grad(lambda q: jnp.sum(blockwise(16, 16)(q, k, v).astype(jnp.float32)))(q)
  assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_jit_vmap_grad_compose(rng):
  q, k, v = (normal(rng, (3, 9, 2, 4)) for _ in range(3))
  fast = blockwise(4, 4)
  batched = jax.jit(functools.partial(fast, is_causal=True))(q, k, v)
  mapped = jax.vmap(functools.partial(fast, is_causal=True))(q, k, v)
  assert_allclose(mapped, batched, rtol=1e-6, atol=1e-6)
  per_example = jax.vmap(jax.grad(lambda q, k, v: jnp.sum(fast(q, k, v) ** 2)))(q, k, v)
  whole = jax.grad(lambda q: jnp.sum(fast(q, k, v) ** 2))(q)
  assert_allclose(per_example, whole, rtol=1e-5, atol=1e-6)


def test_traced_scale_is_differentiable(rng):
  q, k, v = (normal(rng, (5, 1, 4)) for _ in range(3))
  grads = [
    jax.grad(lambda s, fn=fn: jnp.sum(fn(q, k, v, scale=s) ** 2))(0.7)
    for fn in (blockwise(2, 2), naive)
  ]
  assert_allclose(*grads, rtol=1e-5)


def test_self_attention_and_explain_agree_across_implementations(rng):
  """explain's steps are those both paths take: its outputs are self_attention's, its head
  outputs each path's, and its weights the naive path's and exp(scores - lse) of the
  blockwise path's log-sum-exp."""
  params = jattn.init(jax.random.key(0), 8, 4, num_heads=4, num_kv_heads=2, out_features=8)
  x = normal(rng, (2, 11, 8))

  @jax.jit
  def run(x):
    steps = jattn.explain(params, x, is_causal=True)
    qkv = steps["queries"], steps["keys"], steps["values"]
    paths = [
      (
        jattn.self_attention(params, x, is_causal=True, **fn.keywords),
        *fn(*qkv, is_causal=True, return_lse=True),
      )
      for fn in (naive, blockwise(4, 3))
    ]
    return steps, paths, naive(*qkv, is_causal=True, return_weights=True)[1]

  steps, paths, naive_weights = run(x)
  assert_array_equal(naive_weights, steps["weights"])
  for out, heads, lse in paths:
    assert_allclose(out, steps["outputs"], rtol=1e-5, atol=1e-6)
    assert_allclose(heads, steps["head_outputs"], rtol=1e-5, atol=1e-6)
    weights = np.where(steps["mask"], np.exp(steps["scores"] - np.asarray(lse)[..., None]), 0.0)
    assert_allclose(weights, steps["weights"], rtol=1e-5, atol=1e-6)


# --- tiles the mask hides are never visited ----------------------------------------------------


@pytest.mark.parametrize(
  "T, S, opts",
  [
    (8, 8, dict(is_causal=True)),
    (6, 9, dict(is_causal=True)),  # bottom-right aligned: queries are the last 6 of 9
    (9, 9, dict(local_window_size=(2, 1))),
    (6, 10, dict(local_window_size=(1, 2), alignment="top_left")),
  ],
  ids=["causal", "causal T<S", "window", "window top_left T<S"],
)
def test_blockwise_visits_exactly_the_tiles_with_a_visible_score(T, S, opts):
  """The built-in causal and window rules skip whole tiles: a score_mod (it runs on the
  tiles the kernel visits, only there) records the indices it sees, and those tiles are
  exactly the ones holding a visible (query, key) pair. Skipping saves only work, so the
  outputs alone could not tell."""
  bq, bk = 2, 3
  q, k, v = (jax.random.normal(jax.random.key(i), (n, 1, 2)) for i, n in enumerate((T, S, S)))
  seen = set()

  def spy(score, b, h, q_idx, kv_idx):
    jax.debug.callback(lambda i, j: seen.add((int(i) // bq, int(j) // bk)), q_idx, kv_idx)
    return score

  attend = jax.jit(functools.partial(blockwise(bq, bk), score_mod=spy, **opts))
  jax.block_until_ready(attend(q, k, v))
  _, weights = naive(q, k, v, return_weights=True, **opts)
  rows, cols = np.nonzero(np.asarray(weights)[0])
  visible_tiles = set(zip(rows // bq, cols // bk, strict=True))
  assert len(visible_tiles) < (-(-T // bq)) * (-(-S // bk))  # some tiles are hidden
  assert seen == visible_tiles


# --- statistics without the N x N matrix -----------------------------------------------------


def test_stats_and_weight_slices_match_the_full_map(rng):
  q, k = normal(rng, (2, 12, 4, 3)), normal(rng, (2, 10, 2, 3))
  opts = dict(is_causal=True, key_value_seq_lengths=np.array([10, 6], np.int32))
  v = np.zeros((2, 10, 2, 1), np.float32)
  _, w = naive(q, k, v, return_weights=True, **opts)
  w = np.asarray(w, np.float64)
  stats = jattn.attention_stats(q, k, block_q=5, block_kv=4, **opts)
  attended = w.sum(-1) > 0
  assert_allclose(stats["max_weight"], w.max(-1), rtol=1e-5, atol=1e-7)
  entropy = -np.sum(np.where(w > 0, w * np.log(np.where(w > 0, w, 1.0)), 0.0), -1)
  assert_allclose(stats["entropy"], entropy, atol=1e-5)
  _, lse = naive(q, k, v, return_lse=True, **opts)
  assert_array_equal(np.isneginf(stats["lse"]), ~attended)
  assert_allclose(np.asarray(stats["lse"])[attended], np.asarray(lse)[attended], atol=1e-5)
  rows = jattn.attention_weights(q, k, queries=slice(3, 12, 4), **opts)
  assert_allclose(rows, w[:, :, 3:12:4], rtol=1e-5, atol=1e-7)
  picked = jattn.attention_weights(q, k, queries=np.array([11, 0]), **opts)
  assert_allclose(picked, w[:, :, [11, 0]], rtol=1e-5, atol=1e-7)


def test_weights_of_a_slice_at_a_length_where_the_map_would_not_fit():
  """100k queries x 100k keys would be 40 GB per head; three rows are 1.2 MB."""
  T = 100_000
  q = k = jnp.zeros((T, 1, 4))
  w = jax.jit(lambda q, k: jattn.attention_weights(q, k, queries=slice(-3, None), is_causal=True))(
    q, k
  )
  assert w.shape == (1, 3, T)
  assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
  assert_allclose(w[0, 0, : T - 2], 1.0 / (T - 2), rtol=1e-5)  # equal scores: uniform past
  assert_array_equal(w[0, 0, T - 2 :], 0.0)


# --- options and errors --------------------------------------------------------------------


def test_auto_implementation_and_errors(rng):
  q, k, v = (normal(rng, (4, 1, 2)) for _ in range(3))
  with pytest.raises(ValueError, match="never materialises"):
    jattn.dot_product_attention(q, k, v, implementation="blockwise", return_weights=True)
  with pytest.raises(ValueError, match="implementation must be one of"):
    jattn.dot_product_attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="block_kv must be positive"):
    jattn.dot_product_attention(q, k, v, implementation="blockwise", block_kv=0)
  with pytest.raises(TypeError, match="block_q must be a Python int"):
    jattn.dot_product_attention(q, k, v, implementation="blockwise", block_q=2.0)
  long = normal(rng, (300, 1, 2))
  jaxpr = str(jax.make_jaxpr(jattn.dot_product_attention)(long, long, long))
  assert "custom_jvp_call" in jaxpr  # auto took the blockwise path at 300 x 300
  _, w = jattn.dot_product_attention(long, long, long, return_weights=True)
  assert w.shape == (1, 300, 300)  # ... but the naive one when the weights are asked for
  short = str(jax.make_jaxpr(jattn.dot_product_attention)(q, k, v))
  assert "custom_jvp_call" not in short
  # The threshold is 256 x 256 scores, as the README says: T * S = 65,280 naive, 65,536 not.
  for T, tiled in ((255, False), (256, True)):
    q = jax.ShapeDtypeStruct((T, 1, 2), jnp.float32)
    kv = jax.ShapeDtypeStruct((256, 1, 2), jnp.float32)
    jaxpr = str(jax.make_jaxpr(jattn.dot_product_attention)(q, kv, kv))
    assert ("custom_jvp_call" in jaxpr) == tiled, T


def test_default_tiles_follow_the_documented_rule(monkeypatch):
  """benchmarks/README.md's "Tile sizes": the measured shapes, and grouped heads counted."""
  from jattn._blockwise import default_blocks

  assert default_blocks(1024, 1024) == (1024, 1024)
  assert default_blocks(8192, 8192) == (512, 8192)
  assert default_blocks(32768, 32768) == (128, 32768)
  assert default_blocks(65536, 65536) == (128, 32768)  # key blocks of 32,768 beyond
  assert default_blocks(1024, 1024, group=8) == (256, 1024)  # 8 heads x 256 rows per tile
  assert default_blocks(32768, 32768, group=64) == (16, 32768)  # never under 16 queries
  assert default_blocks(8192, 8192, structured=True) == (256, 1024)
  assert default_blocks(100, 40) == (100, 40)  # never past the problem
  seen = []
  spy = lambda *args: seen.append(args) or default_blocks(*args)  # noqa: E731
  monkeypatch.setattr(jattn._blockwise, "default_blocks", spy)
  q = jax.ShapeDtypeStruct((2, 64, 8, 4), jnp.float32)
  kv = jax.ShapeDtypeStruct((2, 64, 2, 4), jnp.float32)
  for causal in (False, True):
    attend = functools.partial(
      jattn.dot_product_attention, implementation="blockwise", is_causal=causal
    )
    jax.eval_shape(attend, q, kv, kv)
  assert seen == [(64, 64, False, 4), (64, 64, True, 4)]  # G = 8 / 2 query heads per group


# --- memory: O(N), measured by XLA and by the operating system --------------------------------


def compiled_temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("mode", ["grad", "jvp", "hvp"])
def test_memory_grows_linearly_not_quadratically(mode):
  def measure(T, implementation):
    q = jax.ShapeDtypeStruct((1, T, 2, 32), jnp.float32)
    attend = functools.partial(jattn.dot_product_attention, implementation=implementation)
    loss = lambda q, k, v: jnp.sum(attend(q, k, v, is_causal=True) ** 2)  # noqa: E731
    if mode == "grad":
      fn = jax.grad(loss, argnums=(0, 1, 2))
    elif mode == "jvp":
      fn = lambda q, k, v: jax.jvp(loss, (q, k, v), (q, k, v))  # noqa: E731
    else:
      fn = lambda q, k, v: jax.jvp(jax.grad(loss), (q, k, v), (q, k, v))[1]  # noqa: E731
    return compiled_temp_bytes(fn, q, q, q)

  scores_bytes = 2 * 4096 * 4096 * 4  # one float32 (N, T, S) array at T = S = 4096
  naive_4k = measure(4096, "naive")
  blockwise_4k, blockwise_8k = measure(4096, "blockwise"), measure(8192, "blockwise")
  assert naive_4k > scores_bytes  # the naive path holds the scores
  assert 8 * blockwise_4k < naive_4k  # a few (block_q, S) tiles instead of (N, T, S) arrays
  assert blockwise_8k < 2.5 * blockwise_4k  # linear in T, not 4x


def test_attention_stats_memory_grows_with_t_not_t_times_s():
  def measure(T):
    q = jax.ShapeDtypeStruct((1, T, 1, 16), jnp.float32)
    return compiled_temp_bytes(lambda q, k: jattn.attention_stats(q, k, is_causal=True), q, q)

  small, large = measure(2048), measure(8192)
  assert large < 8192 * 8192 * 4 / 16  # measured 2.7 MB; the (T, S) scores are 268 MB
  assert large < 2 * small  # 4x the tokens: +17% measured (buffers of fixed size dominate)


@pytest.mark.slow
def test_peak_resident_memory_of_forward_and_backward_in_a_subprocess():
  """At (1, 8192, 8, 64) the naive path needs > 10 GB; blockwise stays under 1 GB resident."""
  script = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, jattn
    from jattn._bench import peak_rss_mb
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 8192, 8, 64)) for i in range(3))
    attend = lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="blockwise")
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * v), argnums=(0, 1, 2)))
    jax.block_until_ready(step(q, k, v))
    print(int(peak_rss_mb()))
    """
  )
  result = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
  )
  peak_mb = int(result.stdout.split()[-1])
  assert peak_mb < 1024, f"peak resident memory {peak_mb} MB"
