"""Side-by-side attention benchmark: jattn against jax.nn, Flax, PyTorch and tokamax.

Every (implementation, variant, shape, mode) runs in its own process, so that its peak
resident memory is its own; the matrix-multiply peak of the machine is measured in the
same run, so the table can say what fraction of it each kernel reaches. The cases come in
groups (:data:`FULL_GROUPS`): a variant (plain, causal, bf16, gqa, decode), its shapes,
modes (fwd, fwd+bwd, jvp) and implementations. ``jattn bench`` runs a quick version (plain
at (4, 1024, 8, 64), fwd and fwd+bwd); ``benchmarks/bench_attention.py`` the full set.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

JAX_IMPLEMENTATIONS = ("jattn-blockwise", "jattn-naive", "jax.nn", "flax.linen")
IMPLEMENTATIONS = (*JAX_IMPLEMENTATIONS, "torch-sdpa", "tokamax-xla-chunked")
# The decode variant compares whole decoding steps (projections, cache update, attention).
DECODE_IMPLEMENTATIONS = ("jattn.decode_step", "flax.nnx")
ALL_IMPLEMENTATIONS = (*IMPLEMENTATIONS, *DECODE_IMPLEMENTATIONS)
MODES = ("fwd", "fwd+bwd", "jvp")
VARIANTS = ("plain", "causal", "bf16", "gqa", "decode")
QUICK_SHAPES = ((4, 1024, 8, 64),)
FULL_SHAPES = ((4, 1024, 8, 64), (1, 8192, 8, 64), (1, 32768, 8, 64))
NAIVE = ("jattn-naive", "jax.nn", "flax.linen")
GQA_GROUP = 8  # query heads per key/value head in the gqa variant
# Optional libraries: their rows are left out when they are not installed.
_MODULES = {"torch-sdpa": "torch", "tokamax-xla-chunked": "tokamax", "flax.nnx": "flax"}


class Group(NamedTuple):
  """Cases of one variant: every shape x mode x implementation."""

  variant: str
  shapes: tuple[tuple[int, int, int, int], ...]
  modes: tuple[str, ...]
  impls: tuple[str, ...]


# The full benchmark (benchmarks/bench_attention.py). Unsupported pairs listed here (torch
# and tokamax in forward mode, flax.linen with fewer key/value heads) give a row that says
# why they were skipped.
FULL_GROUPS = (
  Group("plain", FULL_SHAPES, ("fwd", "fwd+bwd"), IMPLEMENTATIONS),
  Group("plain", ((1, 4096, 8, 64),), ("jvp",), IMPLEMENTATIONS),
  Group(
    "causal",
    ((1, 8192, 8, 64),),
    ("fwd+bwd",),
    ("jattn-blockwise", "torch-sdpa", "tokamax-xla-chunked"),
  ),
  Group(
    "bf16", ((4, 1024, 8, 64),), ("fwd", "fwd+bwd"), ("jattn-blockwise", "jax.nn", "torch-sdpa")
  ),
  Group(
    "gqa",
    ((4, 1024, 8, 64),),
    ("fwd", "fwd+bwd"),
    ("jattn-blockwise", "jax.nn", "flax.linen", "torch-sdpa", "tokamax-xla-chunked"),
  ),
  Group("decode", ((1, 8192, 8, 64),), ("fwd",), DECODE_IMPLEMENTATIONS),
)
QUICK_VARIANTS = ("plain",)
QUICK_MODES = ("fwd", "fwd+bwd")


def reference(variant: str) -> str:
  """The implementation that the "vs jattn-blockwise" column divides by, in this variant."""
  return "jattn.decode_step" if variant == "decode" else "jattn-blockwise"


def attention_flops(shape, mode: str, variant: str = "plain") -> float:
  """The FLOPs credited to one call, from which the table's GFLOP/s come.

  The forward pass is two matmuls (QK^T and PV): ``4 B N T T H``. Conventions:

  - causal: only the visible pairs count, ``T (T + 1) / 2`` instead of ``T^2``.
  - gqa and bf16: as plain (the N query heads do the same work).
  - decode: one new query against a cache of ``T`` keys, ``4 B N T H`` (the projections
    of the new token are not counted).
  - fwd+bwd: 3.5x the forward (the backward pass does 2.5x the forward's work).
  - jvp: 2x the forward (the primal and one tangent). A convention: the tangent's matmuls
    (dQ K^T + Q dK^T and dP V + P dV) are twice the forward's, so this understates jvp.
  """
  B, T, N, H = shape
  if variant == "decode":
    forward = 4.0 * B * N * T * H
  elif variant == "causal":
    forward = 4.0 * B * N * H * T * (T + 1) / 2
  else:
    forward = 4.0 * B * N * T * T * H
  return forward * {"fwd": 1.0, "fwd+bwd": 3.5, "jvp": 2.0}[mode]


def naive_bytes(shape, mode: str, variant: str = "plain") -> float:
  """A lower bound on what materialising the scores needs: 2 (fwd) or 4 (fwd+bwd, jvp) arrays."""
  B, T, N, _ = shape
  if variant == "decode":
    return 0.0
  return B * N * T * T * 4 * (2 if mode == "fwd" else 4)


def unsupported(impl: str, variant: str, mode: str, shape) -> str | None:
  """Why this case cannot run, or None."""
  if variant == "decode" or impl in DECODE_IMPLEMENTATIONS:
    if variant != "decode" or impl not in DECODE_IMPLEMENTATIONS:
      return f"the decode variant compares {' and '.join(DECODE_IMPLEMENTATIONS)} only"
    if mode != "fwd":
      return "decode is timed forward only"
    return None
  if mode == "jvp" and impl == "torch-sdpa":
    return "no forward mode: torch's CPU scaled_dot_product_attention has no forward-AD rule"
  if mode == "jvp" and impl == "tokamax-xla-chunked":
    return "no forward mode: tokamax's attention is a custom_vjp (reverse mode only)"
  if variant == "gqa":
    if shape[2] % GQA_GROUP:
      return f"gqa needs N a multiple of {GQA_GROUP}, got N={shape[2]}"
    if impl == "flax.linen":
      return "no grouped-query attention: flax.linen needs as many key/value heads as queries"
  return None


def _time(fn, repeats: int) -> list[float]:
  fn()  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def _heads(variant: str, N: int) -> int:
  """Key/value heads: N // GQA_GROUP in the gqa variant, else N."""
  return N // GQA_GROUP if variant == "gqa" else N


def _jax_attend(impl: str, shape, variant: str):
  """The attention function of one JAX case, q, k, v -> out."""
  import jax

  causal = variant == "causal"
  if impl in ("jattn-blockwise", "jattn-naive"):
    import jattn

    kind = impl.removeprefix("jattn-")
    return lambda q, k, v: jattn.dot_product_attention(
      q, k, v, implementation=kind, is_causal=causal
    )
  if impl == "jax.nn":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  if impl == "tokamax-xla-chunked":
    import tokamax
    from absl import flags

    if not flags.FLAGS.is_parsed():  # else tokamax parses (and rejects) this process's arguments
      flags.FLAGS(sys.argv[:1])
    return lambda q, k, v: tokamax.dot_product_attention(
      q, k, v, is_causal=causal, implementation="xla_chunked"
    )
  import flax.linen as nn
  import jax.numpy as jnp

  if not causal:
    return nn.dot_product_attention
  B, T = shape[:2]
  # Built inside the traced function, so XLA computes the (B, 1, T, T) mask from iotas.
  return lambda q, k, v: nn.dot_product_attention(
    q, k, v, mask=nn.make_causal_mask(jnp.ones((B, T)))
  )


def jax_inputs(shape, variant: str = "plain"):
  """q, k, v, then the cotangent g (fwd+bwd) or the tangents (g, dk, dv) (jvp), (B, T, ., H).

  float32, or bfloat16 in the bf16 variant; keys and values have N // GQA_GROUP heads in gqa.
  """
  import jax
  import jax.numpy as jnp

  B, T, N, H = shape
  K = _heads(variant, N)
  dtype = jnp.bfloat16 if variant == "bf16" else jnp.float32
  keys = jax.random.split(jax.random.key(0), 6)
  sizes = (N, K, K, N, K, K)
  return tuple(
    jax.random.normal(key, (B, T, n, H), dtype) for key, n in zip(keys, sizes, strict=True)
  )


def _jax_case(impl: str, shape, mode: str, variant: str = "plain"):
  import jax
  import jax.numpy as jnp

  q, k, v, g, dk, dv = jax_inputs(shape, variant)
  attend = _jax_attend(impl, shape, variant)
  if mode == "fwd":
    step = jax.jit(attend)
  elif mode == "fwd+bwd":
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * g), argnums=(0, 1, 2)))
  else:  # forward mode: the output and its tangent along (g, dk, dv)
    step = jax.jit(lambda q, k, v: jax.jvp(attend, (q, k, v), (g, dk, dv)))
  return lambda: jax.block_until_ready(step(q, k, v))


def _torch_case(shape, mode: str, variant: str = "plain"):
  import torch
  import torch.nn.functional as F

  B, T, N, H = shape
  K = _heads(variant, N)
  dtype = torch.bfloat16 if variant == "bf16" else torch.float32
  generator = torch.Generator().manual_seed(0)
  q, k, v, g = (
    torch.randn(B, n, T, H, generator=generator).to(dtype) for n in (N, K, K, N)
  )  # torch's (B, N, T, H) layout
  kwargs = {}
  if variant == "causal":
    kwargs["is_causal"] = True

  def attend(q, k, v):
    if K != N:  # torch 2.13's enable_gqa=True backward is ~60x slower on CPU than this
      k, v = k.repeat_interleave(N // K, dim=1), v.repeat_interleave(N // K, dim=1)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)

  if mode == "fwd":

    def run():
      with torch.no_grad():
        attend(q, k, v)

    return run
  q, k, v = (t.requires_grad_() for t in (q, k, v))

  def run_backward():
    for t in (q, k, v):
      t.grad = None
    attend(q, k, v).backward(g)

  return run_backward


def decode_setup(impl: str, shape):
  """One decoding step and its inputs: ``(step, state, x)``; ``step(state, x) -> (out, state)``.

  A new token against a cache of ``T`` positions, ``F = N * H`` features. Both
  implementations get the same weights (those of the ``flax.nnx.MultiHeadAttention``,
  which are a jattn parameter pytree) and the same cache: ``T - 1`` positions filled with
  the same random keys and values, next index ``T - 1``; so they compute the same outputs,
  and each step writes position ``T - 1`` and attends all ``T``. The jitted step donates
  its state and returns it with the index put back, so every call does the same work.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  B, T, N, H = shape
  F = N * H
  keys = jax.random.split(jax.random.key(0), 3)
  cached_key, cached_value = (jax.random.normal(key, (B, T, N, H)) for key in keys[:2])
  x = jax.random.normal(keys[2], (B, 1, F))
  index = jnp.asarray(T - 1, jnp.int32)
  model = nnx.MultiHeadAttention(
    num_heads=N,
    in_features=F,
    qkv_features=F,
    out_features=F,
    use_bias=False,  # as jattn.init's default
    decode=True,
    rngs=nnx.Rngs(1),
  )
  if impl == "jattn.decode_step":
    import jattn

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def jattn_step(state, x):
      params, cache = state
      out, new = jattn.decode_step(params, cache, x)
      return out, (params, {**new, "index": cache["index"]})

    state = (params, {"key": cached_key, "value": cached_value, "index": index})
    return jax.jit(jattn_step, donate_argnums=0), state, x
  model.init_cache((B, T, F))
  model.cached_key[...] = cached_key
  model.cached_value[...] = cached_value
  model.cache_index[...] = index
  graphdef, state = nnx.split(model)

  def nnx_step(state, x):
    model = nnx.merge(graphdef, state)
    index = model.cache_index[...]
    out = model(x)
    model.cache_index[...] = index
    return out, nnx.state(model)

  return jax.jit(nnx_step, donate_argnums=0), state, x


def _decode_case(impl: str, shape):
  import jax

  step, state, x = decode_setup(impl, shape)
  holder = [state]

  def run():
    out, holder[0] = step(holder[0], x)
    jax.block_until_ready((out, holder[0]))

  return run


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
  """The float32 matrix-multiply rate of this machine, through JAX (best of ``repeats``)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  times = _time(lambda: jax.block_until_ready(matmul(a)), repeats)
  return 2 * size**3 / min(times) / 1e9


def peak_rss_mb() -> float:
  """This process's peak resident memory in MB.

  Reads ``VmHWM`` on Linux: ``ru_maxrss`` also counts the parent's memory at the
  time of the fork, which would charge the parent's footprint to every case.
  """
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(impl: str, shape, mode: str, repeats: int, variant: str = "plain") -> dict:
  """Runs one case in this process and returns its measurements."""
  reason = unsupported(impl, variant, mode, shape)
  if reason is not None:
    raise ValueError(f"{impl}, {variant}, {mode}: {reason}")
  if variant == "decode":
    run = _decode_case(impl, shape)
  elif impl == "torch-sdpa":
    run = _torch_case(shape, mode, variant)
  else:
    run = _jax_case(impl, shape, mode, variant)
  times = _time(run, repeats)
  return {
    "impl": impl,
    "variant": variant,
    "shape": list(shape),
    "mode": mode,
    "median_ms": 1e3 * statistics.median(times),
    "times_ms": [1e3 * t for t in times],
    "peak_rss_mb": peak_rss_mb(),
  }


def run_case(impl, shape, mode, repeats, timeout, memory_limit_gb, variant="plain") -> dict:
  """Runs one case in a subprocess (or returns why it is skipped)."""
  base = {"impl": impl, "variant": variant, "shape": list(shape), "mode": mode}
  reason = unsupported(impl, variant, mode, shape)
  if reason is not None:
    return {**base, "skipped": reason}
  if impl in NAIVE and naive_bytes(shape, mode, variant) > memory_limit_gb * 2**30:
    need = naive_bytes(shape, mode, variant) / 2**30
    return {**base, "skipped": f"needs > {need:.0f} GB (limit {memory_limit_gb:g} GB)"}
  command = [
    sys.executable,
    "-m",
    "jattn._bench",
    "--worker",
    impl,
    ",".join(map(str, shape)),
    mode,
    str(repeats),
    variant,
  ]
  return run_worker(command, base, timeout)


def run_worker(command: list[str], base: dict, timeout: float) -> dict:
  """Runs one benchmark worker process; its last stdout line is its JSON result."""
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {**base, "skipped": f"over {timeout} s"}
  if done.returncode != 0:
    reason = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return {**base, "skipped": f"failed: {reason}"}
  return json.loads(done.stdout.strip().splitlines()[-1])


def available(impl: str) -> bool:
  """Whether the library behind ``impl`` is installed (torch, tokamax and Flax nnx optional)."""
  module = _MODULES.get(impl)
  return module is None or importlib.util.find_spec(module) is not None


def plan(
  groups=FULL_GROUPS, *, shapes=None, variants=VARIANTS, modes=MODES, impls=ALL_IMPLEMENTATIONS
) -> list[tuple[str, tuple, str, str]]:
  """The ``(impl, shape, mode, variant)`` cases of ``groups``, filtered, in order, once each.

  ``shapes`` replaces every group's shapes (for decode, T is the cache length); the others
  keep what is in both the group and the filter. Uninstalled libraries are left out.
  """
  cases = []
  for group in groups:
    if group.variant not in variants:
      continue
    for shape in group.shapes if shapes is None else shapes:
      for mode in group.modes:
        for impl in group.impls:
          case = (impl, tuple(shape), mode, group.variant)
          if mode in modes and impl in impls and available(impl) and case not in cases:
            cases.append(case)
  return cases


def _number(x: float) -> str:
  """Whole numbers from 10 up, three significant digits below (decode steps take < 1 ms)."""
  return f"{x:.0f}" if x >= 10 else f"{x:.3g}"


def _label(r: dict) -> tuple[str, tuple, str]:
  return r.get("variant", "plain"), tuple(r["shape"]), r["mode"]


NOTES = {
  "causal": "causal: is_causal=True (flax.linen: make_causal_mask); GFLOP/s count only the "
  "T (T + 1) / 2 visible query/key pairs, not T^2.",
  "bf16": "bf16: q, k, v and the cotangent (torch: tensors) in bfloat16; % of peak is of the "
  "float32 matmul peak.",
  "gqa": f"gqa: grouped-query attention, N / {GQA_GROUP} key/value heads ({GQA_GROUP} query "
  "heads each; torch repeats the key/value heads, as its enable_gqa=True backward was ~60x "
  "slower on CPU); FLOPs counted as plain (N query heads).",
  "decode": "decode: one jitted decoding step of flax.nnx.MultiHeadAttention(decode=True) and "
  "of jattn.decode_step with the same weights (F = N * H features, no biases): projections of "
  "one new token, the cache update, attention over a cache of T positions (T - 1 pre-filled "
  "with the same random keys and values; both give the same outputs). GFLOP/s count "
  "4 B N T H (attention only); 'vs' divides by jattn.decode_step's time.",
  "jvp": "jvp: jax.jvp of the output along (dq, dk, dv), jitted; GFLOP/s count 2x the forward.",
}


def markdown(results: list[dict], peak: float) -> str:
  """The results table; ratios are within the same variant, shape and mode."""
  peaks = sorted({round(r["matmul_peak_gflops"]) for r in results if "matmul_peak_gflops" in r})
  if len(peaks) > 1:  # results merged from several runs
    head = (
      f"Matrix-multiply peaks measured in the merged runs: {', '.join(map(str, peaks))} GFLOP/s "
      "(float32, 2048^3, JAX); each row's % is of its own run's."
    )
  else:
    head = f"Matrix-multiply peak measured in this run: {peak:.0f} GFLOP/s (float32, 2048^3, JAX)."
  lines = [
    head,
    "",
    "| variant | shape (B, T, N, H) | mode | implementation | median ms | GFLOP/s | % of peak "
    "| peak RSS MB | vs jattn-blockwise |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  ours = {
    _label(r): r.get("median_ms")
    for r in results
    if r["impl"] == reference(r.get("variant", "plain"))
  }
  for r in results:
    variant, shape, mode = _label(r)
    row = f"| {variant} | {shape} | {mode} | {r['impl']} |"
    if "skipped" in r:
      lines.append(f"{row} skipped: {r['skipped']} | | | | |")
      continue
    gflops = attention_flops(shape, mode, variant) / (r["median_ms"] / 1e3) / 1e9
    ref = ours.get((variant, shape, mode))
    ratio = "" if ref is None else f"{r['median_ms'] / ref:.2f}x"
    percent = 100 * gflops / r.get("matmul_peak_gflops", peak)
    lines.append(
      f"{row} {_number(r['median_ms'])} | {_number(gflops)} | {_number(percent)}% | "
      f"{r['peak_rss_mb']:.0f} | {ratio} |"
    )
  lines.append("")
  lines.append(
    "'vs jattn-blockwise': that implementation's time over jattn-blockwise's in the same "
    "variant, shape and mode (above 1: jattn is faster). GFLOP/s: fwd+bwd counts 3.5x the "
    "forward's FLOPs."
  )
  present = {r.get("variant", "plain") for r in results} | {r["mode"] for r in results}
  lines.extend(f"- {note}" for key, note in NOTES.items() if key in present)
  return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  order = {v: n for n, v in enumerate(VARIANTS)}
  cases = sorted({_label(r) for r in results}, key=lambda c: (order.get(c[0], 99), c[1], c[2]))
  impls = [i for i in ALL_IMPLEMENTATIONS if any(r["impl"] == i for r in results)]
  fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(cases) + 2), 8))
  width = 0.8 / max(len(impls), 1)
  for metric, ax, label in (
    ("median_ms", axes[0], "median time (ms)"),
    ("peak_rss_mb", axes[1], "peak resident memory (MB)"),
  ):
    for n, impl in enumerate(impls):
      values = []
      for case in cases:
        match = [r for r in results if r["impl"] == impl and _label(r) == case]
        values.append(match[0].get(metric, math.nan) if match else math.nan)
      ax.bar([c + n * width for c in range(len(cases))], values, width, label=impl)
    ax.set_yscale("log")
    ax.set_xticks(
      [c + 0.4 - width / 2 for c in range(len(cases))],
      [f"{s[0]}x{s[1]}x{s[2]}x{s[3]}\n{v} {m}" for v, s, m in cases],
      fontsize=8,
    )
    ax.set_ylabel(label)
  axes[0].legend(fontsize=8, ncol=2)
  fig.suptitle("attention on CPU, float32 unless bf16 (missing bars: skipped, see the table)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def describe(groups=FULL_GROUPS) -> str:
  """The groups, one line each, for --help."""
  lines = []
  for g in groups:
    shapes = ", ".join("(" + ",".join(map(str, s)) + ")" for s in g.shapes)
    lines.append(f"  {g.variant:7} {'/'.join(g.modes):12} {shapes}: {', '.join(g.impls)}")
  return "\n".join(lines)


def _names(parser, value: str | None, default, known, flag: str) -> tuple[str, ...]:
  if value is None:
    return tuple(default)
  names = tuple(n for n in value.split(",") if n)
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    parser.error(f"{flag}: unknown {unknown or value!r}; choose from {', '.join(known)}")
  return names


def _key(r: dict) -> tuple:
  return r["impl"], *_label(r)


_EPILOG = (
  "Without --full: plain at (4,1024,8,64), fwd and fwd+bwd. --variants, --modes and --impls "
  "keep the cases of the set that they name; --shapes replaces every group's shapes. To split "
  "the full run: --variants plain, then --variants causal,bf16,gqa,decode --merge. Variants: "
  "plain (float32), causal, bf16 (bfloat16 inputs), gqa (N/8 key/value heads), decode (one "
  "token against a cache of T: jattn.decode_step against flax.nnx). Modes: fwd, fwd+bwd (the "
  "gradient of sum(out * g)), jvp (jax.jvp; JAX implementations only). The torch and tokamax "
  "rows are left out when they are not installed."
)


def main(argv: list[str] | None = None, *, full: bool = False, prog: str = "jattn bench") -> int:
  parser = argparse.ArgumentParser(
    prog=prog,
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=(
      "The full set (--full; benchmarks/bench_attention.py): variant, modes, shapes "
      "(B,T,N,H; decode: T is the cache length) and implementations:\n"
      f"{describe()}\n\n" + textwrap.fill(_EPILOG, 88)
    ),
  )
  parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
  parser.add_argument(
    "--shapes",
    default=None,
    help="semicolon-separated B,T,N,H shapes replacing every group's (default: (4,1024,8,64), "
    "or each group's own with --full)",
  )
  parser.add_argument(
    "--full",
    action="store_true",
    default=full,
    help="the full set below: every variant and mode at the issue's shapes",
  )
  parser.add_argument(
    "--variants",
    default=None,
    help=f"comma-separated, of {', '.join(VARIANTS)} (default: plain, or all with --full)",
  )
  parser.add_argument(
    "--impls", default=None, help=f"comma-separated, of {', '.join(ALL_IMPLEMENTATIONS)} (all)"
  )
  parser.add_argument(
    "--modes",
    default=None,
    help=f"comma-separated, of {', '.join(MODES)} (default: fwd,fwd+bwd, or all with --full)",
  )
  parser.add_argument(
    "--repeats",
    type=int,
    default=3,
    help="timed calls per case, after a warm-up (default 3; the table gives their median)",
  )
  parser.add_argument("--timeout", type=int, default=900, help="seconds per case")
  parser.add_argument(
    "--memory-limit-gb",
    type=float,
    default=20.0,
    help="skip naive cases whose scores alone exceed this",
  )
  parser.add_argument(
    "--out", type=Path, default=None, help="folder for results.md, results.json and results.png"
  )
  parser.add_argument(
    "--merge",
    action="store_true",
    help="add to the results.json already in --out (cases run again replace theirs) and "
    "rewrite results.md and results.png from all of them",
  )
  args = parser.parse_args(argv)
  if args.worker:
    impl, shape, mode, repeats, variant = args.worker
    shape = tuple(map(int, shape.split(",")))
    print(json.dumps(worker(impl, shape, mode, int(repeats), variant)))
    return 0
  if args.shapes:
    try:
      shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    except ValueError:
      parser.error(f"--shapes must look like 4,1024,8,64;1,8192,8,64, got {args.shapes!r}")
    if any(len(s) != 4 or min(s) <= 0 for s in shapes):
      parser.error(f"each shape needs four positive sizes B,T,N,H, got {args.shapes!r}")
  else:
    shapes = None if args.full else QUICK_SHAPES
  variants = _names(
    parser, args.variants, VARIANTS if args.full else QUICK_VARIANTS, VARIANTS, "--variants"
  )
  modes = _names(parser, args.modes, MODES if args.full else QUICK_MODES, MODES, "--modes")
  impls = _names(parser, args.impls, ALL_IMPLEMENTATIONS, ALL_IMPLEMENTATIONS, "--impls")
  if args.repeats < 1:
    parser.error("--repeats must be at least 1")
  if args.merge and args.out is None:
    parser.error("--merge needs --out")
  cases = plan(shapes=shapes, variants=variants, modes=modes, impls=impls)
  if not cases:
    parser.error(
      "no case of the set matches --variants/--modes/--impls (or its libraries are not "
      f"installed); the set:\n{describe()}"
    )

  from tqdm import tqdm

  peak = matmul_peak_gflops()
  results = []
  for impl, shape, mode, variant in tqdm(cases, desc="jattn bench", unit="case"):
    result = run_case(impl, shape, mode, args.repeats, args.timeout, args.memory_limit_gb, variant)
    results.append({**result, "matmul_peak_gflops": peak})
  if args.merge and (args.out / "results.json").exists():
    earlier = json.loads((args.out / "results.json").read_text())
    new = {_key(r) for r in results}
    kept = [
      {"matmul_peak_gflops": earlier.get("matmul_peak_gflops", peak), **r}
      for r in earlier["results"]
      if _key(r) not in new
    ]
    results = kept + results
  table = markdown(results, peak)
  print(table)
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(table)
    (args.out / "results.json").write_text(
      json.dumps({"matmul_peak_gflops": peak, "results": results}, indent=1)
    )
    plot(results, args.out / "results.png")
    print(f"wrote {args.out}/results.md, results.json and results.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
