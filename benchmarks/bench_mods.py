"""Programmable attention: jattn's score_mod / mask_mod against PyTorch's flex_attention.

    python benchmarks/bench_mods.py          # writes benchmarks/results/mods.{md,json,png}
    python benchmarks/bench_mods.py --no-torch --cases plain,documents --modes fwd+bwd
    python benchmarks/bench_mods.py --shape 1,2048,8,64 --repeats 2 --out /tmp/mods

CPU, float32, (B, T, N, H) = (1, 8192, 8, 64) by default; "fwd" is the forward pass,
"fwd+bwd" the gradient of sum(out * g) with respect to q, k and v. The cases:

- plain: no mods; jattn blockwise, torch.compile(flex_attention) without mods. jattn plain is
  also the no-mask reference that the other rows are divided by ("tile skipping pays").
- softcap: score_mod ``30 * tanh(s / 30)``.
- documents: 8 equal documents of T/8 tokens, mask_mod "same document", with a tile map
  (``jattn.block_mask`` / ``create_block_mask``) so that tiles no query attends are skipped.
- window1024: mask_mod ``|q_idx - kv_idx| < 1024`` (non-causal), with a tile map.
- window1024-builtin: jattn only, the same window as ``local_window_size=(1023, 1023)``.

Each (library, case, mode) runs in its own subprocess, so its peak resident memory
(``VmHWM``) is its own. Times are the median of ``--repeats`` calls after one call that
compiles and warms up (its time is reported as "first call"); building the tile map is done
once, outside the timed step, in both libraries. flex_attention runs under torch.compile:
without it, it materialises the whole score matrix. torch 2.13.0's flex_attention has no
backward on the CPU (it raises NotImplementedError for inputs that require grad, compiled or
not), so its fwd+bwd cells read "no CPU backward".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

CASES = ("plain", "softcap", "documents", "window1024", "window1024-builtin")
MODES = ("fwd", "fwd+bwd")
LIBS = ("jattn", "flex")
JATTN_ONLY = ("window1024-builtin",)
SOFTCAP = 30.0
DOCUMENTS = 8
WINDOW = 1024
# The targets, as jattn's time over jattn plain's (same mode): at most this.
TARGETS = {("softcap", "fwd+bwd"): 1.25, ("documents", "fwd"): 0.33, ("documents", "fwd+bwd"): 0.33}
NO_CPU_BACKWARD = "no CPU backward"


def _inputs(shape):
  """q, k, v and the cotangent g, (B, T, N, H) float32, the same numbers for both libraries."""
  import numpy as np

  rng = np.random.default_rng(0)
  return [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]


def _time(fn, repeats: int) -> tuple[float, list[float]]:
  start = time.perf_counter()
  fn()  # compile and warm up
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, times


def _time_flex(run, repeats: int):
  """``(_time(run), None)``, or ``(None, reason)`` where torch's flex has no CPU backward."""
  import torch

  try:
    return _time(run, repeats), None
  except NotImplementedError as error:  # torch 2.13: "does not support backward on CPU"
    if "backward on CPU" not in str(error):
      raise
    return None, f"torch {torch.__version__} flex_attention has no CPU backward: {error}"


def _jattn_case(case: str, shape, mode: str):
  """Returns (the timed step, seconds spent building the tile map)."""
  import jax
  import jax.numpy as jnp

  import jattn

  T = shape[1]
  q, k, v, g = (jnp.asarray(x) for x in _inputs(shape))
  kwargs = {}
  setup_s = 0.0
  if case == "softcap":
    kwargs["score_mod"] = lambda s, b, h, q_idx, kv_idx: SOFTCAP * jnp.tanh(s / SOFTCAP)
  elif case in ("documents", "window1024"):
    doc = jnp.arange(T) // max(T // DOCUMENTS, 1)

    def same_document(b, h, q_idx, kv_idx):
      return doc[q_idx] == doc[kv_idx]

    def in_window(b, h, q_idx, kv_idx):
      return jnp.abs(q_idx - kv_idx) < WINDOW

    mask_mod = same_document if case == "documents" else in_window
    start = time.perf_counter()
    bm = jax.block_until_ready(jattn.block_mask(mask_mod, T, T))
    setup_s = time.perf_counter() - start
    kwargs.update(mask_mod=mask_mod, block_mask=bm)
  elif case == "window1024-builtin":
    kwargs["local_window_size"] = (WINDOW - 1, WINDOW - 1)

  def attend(q, k, v):
    return jattn.dot_product_attention(q, k, v, implementation="blockwise", **kwargs)

  if mode == "fwd":
    step = jax.jit(attend)
  else:
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * g), argnums=(0, 1, 2)))
  return (lambda: jax.block_until_ready(step(q, k, v))), setup_s


def _flex_case(case: str, shape, mode: str):
  """Returns (the timed step, seconds spent building the tile map)."""
  import torch
  from torch.nn.attention.flex_attention import create_block_mask, flex_attention

  T = shape[1]
  # flex_attention takes (B, N, T, H); contiguous, as a fresh tensor would be.
  q, k, v, g = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in _inputs(shape))
  kwargs = {}
  setup_s = 0.0
  if case == "softcap":

    def softcap(score, b, h, q_idx, kv_idx):
      return SOFTCAP * torch.tanh(score / SOFTCAP)

    kwargs["score_mod"] = softcap
  elif case in ("documents", "window1024"):
    doc = torch.arange(T) // max(T // DOCUMENTS, 1)

    def same_document(b, h, q_idx, kv_idx):
      return doc[q_idx] == doc[kv_idx]

    def in_window(b, h, q_idx, kv_idx):
      return (q_idx - kv_idx).abs() < WINDOW

    mask_mod = same_document if case == "documents" else in_window
    start = time.perf_counter()
    kwargs["block_mask"] = create_block_mask(
      mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cpu"
    )
    setup_s = time.perf_counter() - start
  elif case != "plain":
    raise ValueError(f"flex_attention has no case {case!r}")
  return _flex_run(torch.compile(flex_attention), kwargs, q, k, v, g, mode), setup_s


def _flex_run(attend, kwargs, q, k, v, g, mode: str):
  """The timed flex_attention step: the forward (no grad), or the gradient of sum(out * g)."""
  import torch

  if mode == "fwd":

    def run():
      with torch.no_grad():
        attend(q, k, v, **kwargs)

    return run
  q, k, v = (t.requires_grad_() for t in (q, k, v))

  def run_backward():
    for t in (q, k, v):
      t.grad = None
    attend(q, k, v, **kwargs).backward(g)

  return run_backward


def _record(base: dict, first: float, times: list, setup_s: float, version: str, threads) -> dict:
  """One measured cell, the same fields in every benchmark of this folder that times flex."""
  from jattn._bench import peak_rss_mb

  return {
    **base,
    "median_s": statistics.median(times),
    "times_s": times,
    "first_call_s": first,
    "block_mask_s": setup_s,
    "peak_rss_mb": peak_rss_mb(),
    "version": version,
    "torch_threads": threads,
  }


def worker(lib: str, case: str, shape, mode: str, repeats: int) -> dict:
  """Runs one case in this process and returns its measurements."""

  base = {"lib": lib, "case": case, "mode": mode, "shape": list(shape)}
  if lib == "jattn":
    run, setup_s = _jattn_case(case, shape, mode)
    first, times = _time(run, repeats)
    import jax

    version = f"jax {jax.__version__}"
    threads = None
  else:
    import torch

    run, setup_s = _flex_case(case, shape, mode)
    timed, reason = _time_flex(run, repeats)
    if reason is not None:
      return {**base, "skipped": reason, "short": NO_CPU_BACKWARD}
    first, times = timed
    version = f"torch {torch.__version__}"
    threads = torch.get_num_threads()
  return _record(base, first, times, setup_s, version, threads)


def run_case(lib, case, shape, mode, repeats, timeout) -> dict:
  base = {"lib": lib, "case": case, "mode": mode, "shape": list(shape)}
  command = [
    sys.executable,
    str(Path(__file__).resolve()),
    "--worker",
    lib,
    case,
    mode,
    ",".join(map(str, shape)),
    str(repeats),
  ]
  from jattn._bench import run_worker

  return run_worker(command, base, timeout)


def _seconds(r: dict | None) -> str:
  if r is None:
    return "not run"
  if "skipped" in r:
    return r.get("short", "skipped (below)")
  return f"{r['median_s']:.3f}"


def _ratio(a: dict | None, b: dict | None) -> float | None:
  if a is None or b is None or "median_s" not in a or "median_s" not in b:
    return None
  return a["median_s"] / b["median_s"]


def _x(ratio: float | None) -> str:
  return "" if ratio is None else f"{ratio:.2f}x"


def markdown(results: list[dict], shape, cases, modes) -> str:
  by = {(r["lib"], r["case"], r["mode"]): r for r in results}
  versions = sorted({r["version"] for r in results if "version" in r})
  threads = {r["torch_threads"] for r in results if r.get("torch_threads")}
  lines = [
    f"score_mod / mask_mod on CPU, float32, (B, T, N, H) = {tuple(shape)}; "
    f"{', '.join(versions) or 'nothing ran'}"
    + (f" ({', '.join(map(str, sorted(threads)))} torch threads)" if threads else "")
    + ". Median seconds after one compile-and-warm-up call.",
    "",
    "| case | mode | jattn s | flex s | jattn / flex | jattn / jattn plain | target "
    "| flex / flex plain | peak RSS MB (jattn / flex) | first call s (jattn / flex) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for case in cases:
    for mode in modes:
      ours, theirs = by.get(("jattn", case, mode)), by.get(("flex", case, mode))
      plain, flex_plain = by.get(("jattn", "plain", mode)), by.get(("flex", "plain", mode))
      vs_plain = None if case == "plain" else _ratio(ours, plain)
      flex_vs_plain = None if case == "plain" else _ratio(theirs, flex_plain)
      target = TARGETS.get((case, mode))
      goal = ""
      if target is not None:
        goal = f"<= {target}x" + (
          "" if vs_plain is None else f": {'met' if vs_plain <= target else 'missed'}"
        )
      flex_cell = "n/a" if case in JATTN_ONLY else _seconds(theirs)
      rss = " / ".join(
        f"{r['peak_rss_mb']:.0f}" if r and "peak_rss_mb" in r else "-" for r in (ours, theirs)
      )
      first = " / ".join(
        f"{r['first_call_s']:.1f}" if r and "first_call_s" in r else "-" for r in (ours, theirs)
      )
      lines.append(
        f"| {case} | {mode} | {_seconds(ours)} | {flex_cell} | {_x(_ratio(ours, theirs))} "
        f"| {_x(vs_plain)} | {goal} | {_x(flex_vs_plain)} "
        f"| {rss} | {first} |"
      )
  lines += [
    "",
    "'jattn / flex': below 1, jattn is faster. 'jattn / jattn plain': that case's time over "
    "jattn plain (no mask, every tile computed) in the same mode; for documents it says "
    "whether tile skipping pays (the issue's targets: softcap within 1.25x of plain, fwd+bwd; "
    "documents at most 0.33x, fwd and fwd+bwd). Building the tile map is not in the times "
    "(first call includes compiling).",
  ]
  skipped = [r for r in results if "skipped" in r]
  if skipped:
    lines += ["", "Skipped:", ""]
    lines += [f"- {r['lib']} {r['case']} {r['mode']}: {r['skipped']}" for r in skipped]
  return "\n".join(lines) + "\n"


def plot(results: list[dict], shape, cases, modes, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  by = {(r["lib"], r["case"], r["mode"]): r for r in results}
  fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.5), squeeze=False)
  width = 0.4
  for ax, mode in zip(axes[0], modes, strict=True):
    for n, lib in enumerate(LIBS):
      values = [by.get((lib, case, mode), {}).get("median_s", math.nan) for case in cases]
      ax.bar([c + n * width for c in range(len(cases))], values, width, label=lib)
    ax.set_xticks([c + width / 2 for c in range(len(cases))], cases, fontsize=8, rotation=15)
    ax.set(ylabel="median time (s)", title=mode)
    ax.legend(fontsize=8)
  fig.suptitle(
    f"jattn mods vs torch flex_attention, CPU float32, {tuple(shape)} "
    "(missing bars: unsupported there, see mods.md)"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _parse_list(parser, value: str, allowed, what: str) -> list[str]:
  items = [x for x in value.split(",") if x]
  unknown = [x for x in items if x not in allowed]
  if unknown or not items:
    parser.error(f"{what} must be comma-separated names from {allowed}, got {value!r}")
  return [x for x in allowed if x in items]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
  parser.add_argument("--shape", default="1,8192,8,64", help="B,T,N,H (default 1,8192,8,64)")
  parser.add_argument("--modes", default=",".join(MODES), help=f"from {MODES}")
  parser.add_argument("--cases", default=",".join(CASES), help=f"from {CASES}")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
  parser.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
  parser.add_argument(
    "--out",
    type=Path,
    default=Path(__file__).parent / "results",
    help="folder for mods.md, mods.json and mods.png (default benchmarks/results)",
  )
  parser.add_argument("--no-torch", action="store_true", help="run the jattn rows only")
  args = parser.parse_args(argv)
  if args.worker:
    lib, case, mode, shape, repeats = args.worker
    result = worker(lib, case, tuple(map(int, shape.split(","))), mode, int(repeats))
    print(json.dumps(result))
    return 0
  try:
    shape = tuple(int(x) for x in args.shape.split(","))
  except ValueError:
    parser.error(f"--shape must look like 1,8192,8,64, got {args.shape!r}")
  if len(shape) != 4 or min(shape) <= 0:
    parser.error(f"--shape needs four positive sizes B,T,N,H, got {args.shape!r}")
  modes = _parse_list(parser, args.modes, MODES, "--modes")
  cases = _parse_list(parser, args.cases, CASES, "--cases")
  if args.repeats < 1:
    parser.error("--repeats must be at least 1")

  libs = ["jattn"]
  if args.no_torch:
    pass
  elif importlib.util.find_spec("torch") is None:
    print("torch is not installed: the flex rows are left out (pip install torch==2.13.0)")
  else:
    libs.append("flex")

  results = []
  for case in cases:
    for mode in modes:
      for lib in libs:
        if lib == "flex" and case in JATTN_ONLY:
          continue
        result = run_case(lib, case, shape, mode, args.repeats, args.timeout)
        results.append(result)
        done = result.get("skipped") or (
          f"{result['median_s']:.3f} s (first call {result['first_call_s']:.1f} s, "
          f"tile map {result['block_mask_s']:.2f} s, peak RSS {result['peak_rss_mb']:.0f} MB)"
        )
        print(f"{lib:5} {case:18} {mode:7} {done}", flush=True)

  table = markdown(results, shape, cases, modes)
  print()
  print(table)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "mods.md").write_text(table)
  (args.out / "mods.json").write_text(
    json.dumps({"shape": list(shape), "repeats": args.repeats, "results": results}, indent=1)
  )
  plot(results, shape, cases, modes, args.out / "mods.png")
  print(f"wrote {args.out}/mods.md, mods.json and mods.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
