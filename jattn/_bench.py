"""Side-by-side attention benchmark: jattn against jax.nn, Flax and PyTorch.

Every (implementation, shape, mode) runs in its own process, so that its peak
resident memory is its own; the matrix-multiply peak of the machine is measured
in the same run, so the table can say what fraction of it each kernel reaches.
``jattn bench`` runs a quick version; ``benchmarks/bench_attention.py`` the full one.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLEMENTATIONS = ("jattn-blockwise", "jattn-naive", "jax.nn", "flax.linen", "torch-sdpa")
MODES = ("fwd", "fwd+bwd")
QUICK_SHAPES = ((4, 1024, 8, 64),)
FULL_SHAPES = ((4, 1024, 8, 64), (1, 8192, 8, 64), (1, 32768, 8, 64))
NAIVE = ("jattn-naive", "jax.nn", "flax.linen")


def attention_flops(shape, mode: str) -> float:
  """Two matmuls forward (QK^T and PV); the backward pass does 2.5x the forward's work."""
  B, T, N, H = shape
  forward = 4.0 * B * N * T * T * H
  return forward if mode == "fwd" else 3.5 * forward


def naive_bytes(shape, mode: str) -> float:
  """A lower bound on what materialising the scores needs: 2 (fwd) or 4 (fwd+bwd) arrays."""
  B, T, N, _ = shape
  return B * N * T * T * 4 * (2 if mode == "fwd" else 4)


def _time(fn, repeats: int) -> list[float]:
  fn()  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def _jax_case(impl: str, shape, mode: str):
  import jax
  import jax.numpy as jnp

  import jattn

  B, T, N, H = shape
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(key, (B, T, N, H), jnp.float32) for key in keys)
  if impl == "jattn-blockwise":
    attend = lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="blockwise")  # noqa: E731
  elif impl == "jattn-naive":
    attend = lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="naive")  # noqa: E731
  elif impl == "jax.nn":
    attend = jax.nn.dot_product_attention
  else:
    import flax.linen as nn

    attend = nn.dot_product_attention
  if mode == "fwd":
    step = jax.jit(attend)
  else:
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * g), argnums=(0, 1, 2)))
  return lambda: jax.block_until_ready(step(q, k, v))


def _torch_case(shape, mode: str):
  import torch
  import torch.nn.functional as F

  B, T, N, H = shape
  generator = torch.Generator().manual_seed(0)
  q, k, v, g = (torch.randn(B, N, T, H, generator=generator) for _ in range(4))
  if mode == "fwd":

    def run():
      with torch.no_grad():
        F.scaled_dot_product_attention(q, k, v)

    return run
  q, k, v = (t.requires_grad_() for t in (q, k, v))

  def run_backward():
    for t in (q, k, v):
      t.grad = None
    F.scaled_dot_product_attention(q, k, v).backward(g)

  return run_backward


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


def worker(impl: str, shape, mode: str, repeats: int) -> dict:
  """Runs one case in this process and returns its measurements."""
  run = _torch_case(shape, mode) if impl == "torch-sdpa" else _jax_case(impl, shape, mode)
  times = _time(run, repeats)
  return {
    "impl": impl,
    "shape": list(shape),
    "mode": mode,
    "median_ms": 1e3 * statistics.median(times),
    "times_ms": [1e3 * t for t in times],
    "peak_rss_mb": peak_rss_mb(),
  }


def run_case(impl, shape, mode, repeats, timeout, memory_limit_gb) -> dict:
  base = {"impl": impl, "shape": list(shape), "mode": mode}
  if impl in NAIVE and naive_bytes(shape, mode) > memory_limit_gb * 2**30:
    need = naive_bytes(shape, mode) / 2**30
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
  if impl != "torch-sdpa":
    return True
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def markdown(results: list[dict], peak: float) -> str:
  lines = [
    f"Matrix-multiply peak measured in this run: {peak:.0f} GFLOP/s (float32, 2048^3, JAX).",
    "",
    "| shape (B, T, N, H) | mode | implementation | median ms | GFLOP/s | % of peak "
    "| peak RSS MB | vs jattn-blockwise |",
    "|---|---|---|---|---|---|---|---|",
  ]
  ours = {
    (tuple(r["shape"]), r["mode"]): r.get("median_ms")
    for r in results
    if r["impl"] == "jattn-blockwise"
  }
  for r in results:
    shape, mode = tuple(r["shape"]), r["mode"]
    if "skipped" in r:
      lines.append(f"| {shape} | {mode} | {r['impl']} | skipped: {r['skipped']} | | | | |")
      continue
    gflops = attention_flops(shape, mode) / (r["median_ms"] / 1e3) / 1e9
    ref = ours.get((shape, mode))
    ratio = "" if ref is None else f"{r['median_ms'] / ref:.2f}x"
    lines.append(
      f"| {shape} | {mode} | {r['impl']} | {r['median_ms']:.0f} | {gflops:.0f} | "
      f"{100 * gflops / peak:.0f}% | {r['peak_rss_mb']:.0f} | {ratio} |"
    )
  lines.append("")
  lines.append(
    "'vs jattn-blockwise': that implementation's time over jattn-blockwise's "
    "(above 1: jattn is faster)."
  )
  return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cases = sorted({(tuple(r["shape"]), r["mode"]) for r in results})
  impls = [i for i in IMPLEMENTATIONS if any(r["impl"] == i for r in results)]
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  width = 0.8 / max(len(impls), 1)
  for metric, ax, label in (
    ("median_ms", axes[0], "median time (ms)"),
    ("peak_rss_mb", axes[1], "peak resident memory (MB)"),
  ):
    for n, impl in enumerate(impls):
      values = []
      for case in cases:
        match = [r for r in results if r["impl"] == impl and (tuple(r["shape"]), r["mode"]) == case]
        values.append(match[0].get(metric, math.nan) if match else math.nan)
      ax.bar([c + n * width for c in range(len(cases))], values, width, label=impl)
    ax.set_yscale("log")
    ax.set_xticks(
      [c + 0.4 - width / 2 for c in range(len(cases))],
      [f"{s[0]}x{s[1]}x{s[2]}x{s[3]}\n{m}" for s, m in cases],
      fontsize=8,
    )
    ax.set_ylabel(label)
  axes[0].legend(fontsize=8)
  fig.suptitle("attention on CPU, float32 (missing bars: skipped, see the table)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None, *, full: bool = False) -> int:
  parser = argparse.ArgumentParser(prog="jattn bench", description=__doc__.splitlines()[0])
  parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
  parser.add_argument(
    "--shapes", default=None, help="semicolon-separated B,T,N,H shapes (default: quick or full set)"
  )
  parser.add_argument(
    "--full",
    action="store_true",
    default=full,
    help="the issue's shapes: (4,1024,8,64), (1,8192,8,64), (1,32768,8,64)",
  )
  parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--repeats", type=int, default=3)
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
  args = parser.parse_args(argv)
  if args.worker:
    impl, shape, mode, repeats = args.worker
    print(json.dumps(worker(impl, tuple(map(int, shape.split(","))), mode, int(repeats))))
    return 0
  if args.shapes:
    try:
      shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    except ValueError:
      parser.error(f"--shapes must look like 4,1024,8,64;1,8192,8,64, got {args.shapes!r}")
    if any(len(s) != 4 or min(s) <= 0 for s in shapes):
      parser.error(f"each shape needs four positive sizes B,T,N,H, got {args.shapes!r}")
  else:
    shapes = FULL_SHAPES if args.full else QUICK_SHAPES
  impls = args.impls.split(",")
  unknown = [i for i in impls if i not in IMPLEMENTATIONS]
  modes = args.modes.split(",")
  if unknown or any(m not in MODES for m in modes):
    parser.error(f"implementations are {IMPLEMENTATIONS} and modes {MODES}")
  if args.repeats < 1:
    parser.error("--repeats must be at least 1")

  from tqdm import tqdm

  peak = matmul_peak_gflops()
  cases = [(i, s, m) for s in shapes for m in modes for i in impls if available(i)]
  results = []
  for impl, shape, mode in tqdm(cases, desc="jattn bench", unit="case"):
    results.append(run_case(impl, shape, mode, args.repeats, args.timeout, args.memory_limit_gb))
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
