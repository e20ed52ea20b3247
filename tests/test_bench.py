"""The benchmark harness (jattn._bench): FLOP conventions, ratios within a variant, the
plan of cases, what each variant computes, and one tiny run of each new mode and variant."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import _bench

HAS_TOKAMAX = importlib.util.find_spec("tokamax") is not None
SHAPE = (1, 64, 8, 16)  # N = 8: one key/value head in the gqa variant


def test_attention_flops_conventions():
  B, T, N, H = shape = (2, 128, 8, 16)
  fwd = 4.0 * B * N * T * T * H
  assert _bench.attention_flops(shape, "fwd") == fwd
  assert _bench.attention_flops(shape, "fwd+bwd") == 3.5 * fwd
  assert _bench.attention_flops(shape, "jvp") == 2 * fwd
  # causal: the T (T + 1) / 2 visible pairs only
  assert _bench.attention_flops(shape, "fwd", "causal") == fwd * (T + 1) / (2 * T)
  assert _bench.attention_flops(shape, "jvp", "causal") == 2 * fwd * (T + 1) / (2 * T)
  for variant in ("gqa", "bf16"):  # N query heads: as plain
    assert _bench.attention_flops(shape, "fwd+bwd", variant) == 3.5 * fwd
  assert _bench.attention_flops(shape, "fwd", "decode") == 4.0 * B * N * T * H
  # naive memory: jvp holds as many score arrays as fwd+bwd
  assert _bench.naive_bytes(shape, "jvp") == _bench.naive_bytes(shape, "fwd+bwd")
  assert _bench.naive_bytes(shape, "jvp") == 2 * _bench.naive_bytes(shape, "fwd")


def record(impl, variant, ms, shape=(1, 1024, 8, 64), mode="fwd"):
  return {
    "impl": impl,
    "variant": variant,
    "shape": list(shape),
    "mode": mode,
    "median_ms": ms,
    "peak_rss_mb": 100.0,
  }


def test_markdown_ratios_are_within_the_same_variant_shape_and_mode():
  results = [
    record("jattn-blockwise", "plain", 10.0),
    record("jax.nn", "plain", 30.0),
    record("jattn-blockwise", "causal", 5.0),
    record("torch-sdpa", "causal", 20.0),
    record("jax.nn", "bf16", 40.0),  # no jattn-blockwise row in bf16: no ratio
    record("jattn-blockwise", "plain", 100.0, mode="fwd+bwd"),
    record("jax.nn", "plain", 150.0, mode="fwd+bwd"),
    record("jattn.decode_step", "decode", 0.5, shape=(1, 8192, 8, 64)),
    record("flax.nnx", "decode", 1.5, shape=(1, 8192, 8, 64)),
    {**record("flax.linen", "gqa", 0), "skipped": "no grouped-query attention"},
  ]
  old = record("flax.linen", "plain", 20.0)
  del old["variant"]  # results.json of earlier runs: plain
  table = _bench.markdown([*results, old], peak=100.0)
  plain = 4.0 * 8 * 1024 * 1024 * 64 / 1e9  # GFLOP of one plain forward
  causal = plain * 1025 / 2048  # the visible pairs

  def row(variant, mode, impl, ms, gflop, ratio):  # peak 100: % of peak = GFLOP/s
    rate = f"{gflop / (ms / 1e3):.0f}"
    cells = (variant, "(1, 1024, 8, 64)", mode, impl, ms, rate, f"{rate}%", 100, ratio)
    return "| " + " | ".join(map(str, cells)) + " |"

  for line in (
    row("plain", "fwd", "jattn-blockwise", 10, plain, "1.00x"),
    row("plain", "fwd", "jax.nn", 30, plain, "3.00x"),
    row("plain", "fwd", "flax.linen", 20, plain, "2.00x"),
    row("causal", "fwd", "jattn-blockwise", 5, causal, "1.00x"),
    row("causal", "fwd", "torch-sdpa", 20, causal, "4.00x"),
    row("bf16", "fwd", "jax.nn", 40, plain, ""),
    row("plain", "fwd+bwd", "jax.nn", 150, 3.5 * plain, "1.50x"),
    "| decode | (1, 8192, 8, 64) | fwd | flax.nnx | 1.5 | 11 | 11% | 100 | 3.00x |",
    "| gqa | (1, 1024, 8, 64) | fwd | flax.linen | skipped: no grouped-query attention |",
  ):
    assert line in table, line
  assert "visible" in table and "bfloat16" in table and "decode" in table
  assert "jvp:" not in table  # a note for each variant or mode present, only those


def test_markdown_of_merged_runs_gives_each_row_its_own_peak():
  results = [
    {**record("jattn-blockwise", "plain", 10.0), "matmul_peak_gflops": 100.0},
    {**record("jattn-blockwise", "causal", 10.0), "matmul_peak_gflops": 200.0},
  ]
  table = _bench.markdown(results, peak=200.0)
  assert "peaks measured in the merged runs: 100, 200 GFLOP/s" in table
  assert "| 10 | 215 | 215% |" in table and "| 10 | 107 | 54% |" in table


def test_plan_keeps_what_the_filters_name_and_replaces_shapes():
  tiny = (1, 64, 8, 16)
  cases = _bench.plan(
    shapes=[tiny], variants=("gqa", "decode"), modes=("fwd",), impls=("jattn-blockwise", "flax.nnx")
  )
  assert cases == [("jattn-blockwise", tiny, "fwd", "gqa"), ("flax.nnx", tiny, "fwd", "decode")]
  # jvp only in its own group; tokamax and torch listed there (their rows say why not)
  jvp = _bench.plan(modes=("jvp",))
  assert {c[1] for c in jvp} == {(1, 4096, 8, 64)}
  assert [c[0] for c in jvp] == [i for i in _bench.IMPLEMENTATIONS if _bench.available(i)]
  # The two plain groups at the replaced shapes: each mode and implementation once.
  plain = _bench.plan(shapes=[tiny], variants=("plain",))
  assert len(plain) == len(set(plain)) == 3 * len(jvp)
  assert {c[2] for c in plain} == {"fwd", "fwd+bwd", "jvp"}


def test_unsupported_cases_are_skipped_with_their_reason_without_a_process():
  for impl, variant, mode, reason in (
    ("tokamax-xla-chunked", "plain", "jvp", "no forward mode: tokamax's attention is a custom_vjp"),
    ("torch-sdpa", "causal", "jvp", "no forward mode: torch's CPU"),
    ("flax.linen", "gqa", "fwd", "no grouped-query attention"),
    ("jattn.decode_step", "decode", "fwd+bwd", "decode is timed forward only"),
    ("jattn-blockwise", "decode", "fwd", "the decode variant compares"),
    ("flax.nnx", "plain", "fwd", "the decode variant compares"),
  ):
    result = _bench.run_case(impl, SHAPE, mode, 1, 1e-9, 20.0, variant)
    assert result["skipped"].startswith(reason), result
    assert result["variant"] == variant
    with pytest.raises(ValueError, match=reason[:20]):
      _bench.worker(impl, SHAPE, mode, 1, variant)
  gqa = _bench.run_case("jax.nn", (1, 64, 4, 16), "fwd", 1, 1e-9, 20.0, "gqa")
  assert gqa["skipped"] == "gqa needs N a multiple of 8, got N=4"


@pytest.mark.parametrize("variant", ["plain", "bf16", "gqa"])
def test_the_jax_inputs_of_each_variant(variant):
  B, T, N, H = SHAPE
  K = 1 if variant == "gqa" else N
  dtype = jnp.bfloat16 if variant == "bf16" else jnp.float32
  q, k, v, g, dk, dv = _bench.jax_inputs(SHAPE, variant)
  assert q.shape == g.shape == (B, T, N, H)  # g: the cotangent, or q's tangent in jvp
  assert k.shape == v.shape == dk.shape == dv.shape == (B, T, K, H)
  assert {x.dtype for x in (q, k, v, g, dk, dv)} == {jnp.dtype(dtype)}


def reference(q, k, v, causal):
  """Attention in float64 NumPy, (B, T, N, H), key/value heads repeated for GQA."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = (np.repeat(x, group, axis=2) for x in (k, v))
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  if causal:
    T = q.shape[1]
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("variant", ["plain", "causal", "bf16", "gqa"])
def test_each_implementation_computes_its_variants_attention(variant):
  B, T, N, H = shape = (1, 16, 8, 4)
  K = 1 if variant == "gqa" else N
  dtype = jnp.bfloat16 if variant == "bf16" else jnp.float32
  keys = jax.random.split(jax.random.key(1), 3)
  q, k, v = (
    jax.random.normal(key, (B, T, n, H), dtype) for key, n in zip(keys, (N, K, K), strict=True)
  )
  expected = reference(q, k, v, causal=variant == "causal")
  for impl in _bench.JAX_IMPLEMENTATIONS + (("tokamax-xla-chunked",) if HAS_TOKAMAX else ()):
    if _bench.unsupported(impl, variant, "fwd", shape):
      continue
    out = _bench._jax_attend(impl, shape, variant)(q, k, v)
    assert out.shape == (B, T, N, H) and out.dtype == dtype, impl
    np.testing.assert_allclose(
      np.asarray(out, np.float64), expected, atol=3e-2 if dtype == jnp.bfloat16 else 1e-5
    )


@pytest.mark.parametrize("variant", ["causal", "bf16", "gqa"])
def test_the_torch_case_of_each_variant(variant, monkeypatch):
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F

  calls = []
  sdpa = F.scaled_dot_product_attention

  def recording(q, k, v, **kwargs):
    calls.append((q, k, v, kwargs))
    return sdpa(q, k, v, **kwargs)

  monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
  B, T, N, H = SHAPE
  for mode in ("fwd", "fwd+bwd"):
    _bench._torch_case(SHAPE, mode, variant)()
  for q, k, v, kwargs in calls:
    assert q.shape == k.shape == v.shape == (B, N, T, H)  # torch's layout; gqa: heads repeated
    assert q.dtype == (torch.bfloat16 if variant == "bf16" else torch.float32)
    assert kwargs == {"causal": {"is_causal": True}}.get(variant, {})
    if variant == "gqa":  # each key/value head serves GQA_GROUP consecutive query heads
      torch.testing.assert_close(k, k[:, :1].expand(B, N, T, H))


def test_decode_steps_agree_and_keep_their_cache_index():
  B, T, N, H = shape = (2, 32, 8, 4)
  outs = {}
  for impl in _bench.DECODE_IMPLEMENTATIONS:
    step, state, x = _bench.decode_setup(impl, shape)
    assert x.shape == (B, 1, N * H)
    out, state = step(state, x)
    again, state = step(state, x)  # the same work: the index was put back
    np.testing.assert_array_equal(out, again)
    leaves = jax.tree.leaves_with_path(state)
    (index,) = [leaf for path, leaf in leaves if "index" in jax.tree_util.keystr(path)]
    assert int(index) == T - 1
    outs[impl] = out
  # Same weights, same pre-filled cache: Flax's decode and jattn's give the same tokens.
  np.testing.assert_allclose(outs["flax.nnx"], outs["jattn.decode_step"], atol=1e-5)


def test_a_tiny_case_of_each_new_mode_and_variant_runs():
  cases = [
    ("jattn-blockwise", "jvp", "plain"),
    ("jax.nn", "fwd+bwd", "causal"),
    ("jattn-blockwise", "fwd+bwd", "bf16"),
    ("jattn-blockwise", "fwd", "gqa"),
    ("flax.nnx", "fwd", "decode"),
  ]
  for impl, mode, variant in cases:
    result = _bench.worker(impl, SHAPE, mode, 2, variant)
    assert result["median_ms"] > 0 and len(result["times_ms"]) == 2
    assert (result["impl"], result["mode"], result["variant"]) == (impl, mode, variant)


@pytest.mark.slow
def test_tokamax_runs_in_its_own_process_despite_its_absl_flags():
  pytest.importorskip("tokamax")
  # The worker's arguments (--worker ...) must not reach tokamax's absl flag parser (nor,
  # in the tests above, pytest's).
  result = _bench.run_case("tokamax-xla-chunked", SHAPE, "fwd+bwd", 1, 120, 20.0, "gqa")
  assert "skipped" not in result, result
  assert result["variant"] == "gqa" and result["median_ms"] > 0
