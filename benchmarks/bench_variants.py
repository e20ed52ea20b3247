"""Attention variants: packed documents and soft-capping against tokamax and flex_attention.

    python benchmarks/bench_variants.py --ring   # writes benchmarks/results/variants.{md,json,png}
    python benchmarks/bench_variants.py --no-torch --no-tokamax --cases causal,documents
    python benchmarks/bench_variants.py --shape 1,512,2,32 --repeats 1 --ring --out /tmp/variants

CPU, float32, q/k/v (B, T, N, H). "fwd" is the forward pass, "fwd+bwd" the gradient of
sum(out * g) with respect to q, k and v, "jvp" ``jax.jvp`` of the output with respect to
q, k and v (forward mode). The cases, all through ``jattn.dot_product_attention(...,
implementation="blockwise")``:

- causal: ``is_causal=True`` at ``--shape`` (1, 8192, 8, 64 by default): the reference that
  the documents are divided by. Also flex_attention with a causal mask_mod and tile map.
- documents: 8 equal packed documents of T/8 tokens, ``is_causal=True,
  q_segment_ids=...`` at ``--shape``; tiles whose segments cannot meet are skipped. The
  issue's target: at most 1/6 of causal's time, fwd and fwd+bwd. Also flex_attention with a
  "same document and causal" mask_mod and ``create_block_mask``.
- softcap: ``logits_soft_cap=30`` (``30 * tanh(s / 30)``), no mask, at ``--softcap-shapes``
  ((4, 1024, 8, 64) and (1, 8192, 8, 64) by default), against tokamax
  ``dot_product_attention(..., logits_soft_cap=30.0, implementation="xla_chunked")`` and
  flex_attention with a soft-cap score_mod.

Each (library, case, shape, mode) runs in its own subprocess, so its peak resident memory
(``VmHWM``) is its own. Times are the median of ``--repeats`` calls after one call that
compiles and warms up (its time is reported as "first call"); flex's tile map
(``create_block_mask``) is built once, outside the timed step. flex_attention runs under
torch.compile. torch 2.13.0's flex_attention has no backward on the CPU (it raises
NotImplementedError), so its fwd+bwd cells read "no CPU backward". Forward mode is probed in
the worker at a tiny size first: tokamax's attention is a ``custom_vjp`` and flex_attention
has no forward-mode rule, so those jvp cells read "no forward mode" (and are timed instead,
with a note, should the probe ever pass). tokamax and torch are optional: their cells are left
out when they are not installed.

``--ring`` adds a separate section: ``jattn.ring_attention`` on 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set in its own subprocesses), causal,
at ``--shape``, with and without the 8 documents, in the contiguous and the zig-zag layout
(inputs and segment ids permuted by ``jattn.zigzag_order(T, 8)``): XLA's per-device memory of
the compiled forward+backward step (``memory_analysis()``) and its time. The simulated
devices share this machine's cores, so the time is the total work of all eight devices.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mods import (
  NO_CPU_BACKWARD,
  _flex_run,
  _inputs,
  _parse_list,
  _ratio,
  _record,
  _seconds,
  _time,
  _time_flex,
  _x,
)

CASES = ("causal", "documents", "softcap")
MODES = ("fwd", "fwd+bwd", "jvp")
LIBS = ("jattn", "tokamax", "flex")
CASE_LIBS = {
  "causal": ("jattn", "flex"),
  "documents": ("jattn", "flex"),
  "softcap": ("jattn", "tokamax", "flex"),
}
# What each jattn case is divided by (same shape and mode); peers are divided by jattn's
# time for their own case.
JATTN_BASELINE = {"documents": "causal"}
DEFAULT_SHAPE = (1, 8192, 8, 64)
DEFAULT_SOFTCAP_SHAPES = ((4, 1024, 8, 64), (1, 8192, 8, 64))
SOFTCAP = 30.0
DOCUMENTS = 8
RING_DEVICES = 8
LAYOUTS = ("contiguous", "zigzag")
# The issue's target: jattn documents' time over jattn causal's (same mode), at most this.
TARGET = 1 / 6
TARGET_MODES = ("fwd", "fwd+bwd")
PROBE_SHAPE = (1, 64, 2, 16)
NO_FORWARD_MODE = "no forward mode"


def _documents(shape):
  """(B, T) int32 segment ids: DOCUMENTS equal documents of T / DOCUMENTS tokens."""
  import numpy as np

  B, T = shape[:2]
  return np.broadcast_to(np.arange(T, dtype=np.int32) // max(T // DOCUMENTS, 1), (B, T)).copy()


def _jax_attend(lib: str, case: str, shape):
  """The attention function of one JAX case, q, k, v -> out."""
  import jax.numpy as jnp

  if lib == "tokamax":
    import tokamax

    if case != "softcap":
      raise ValueError(f"tokamax has no case {case!r} here")
    return lambda q, k, v: tokamax.dot_product_attention(
      q, k, v, logits_soft_cap=SOFTCAP, implementation="xla_chunked"
    )
  import jattn

  kwargs = {"implementation": "blockwise"}
  if case in ("causal", "documents"):
    kwargs["is_causal"] = True
  if case == "documents":
    kwargs["q_segment_ids"] = jnp.asarray(_documents(shape))
  elif case == "softcap":
    kwargs["logits_soft_cap"] = SOFTCAP
  return lambda q, k, v: jattn.dot_product_attention(q, k, v, **kwargs)


def _jax_step(lib: str, case: str, shape, mode: str):
  """The timed step of one JAX case."""
  import jax
  import jax.numpy as jnp

  q, k, v, g = (jnp.asarray(x) for x in _inputs(shape))
  attend = _jax_attend(lib, case, shape)
  if mode == "fwd":
    step = jax.jit(attend)
  elif mode == "fwd+bwd":
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * g), argnums=(0, 1, 2)))
  else:
    tangents = (g, q, k)  # any fixed directions
    step = jax.jit(lambda q, k, v: jax.jvp(attend, (q, k, v), tangents))
  return lambda: jax.block_until_ready(step(q, k, v))


def _probe_jax_forward_mode(lib: str, case: str) -> str | None:
  """None if ``jax.jvp`` of the case works at a tiny size, else why not."""
  import jax

  q, k, v, _ = _inputs(PROBE_SHAPE)
  try:
    jax.block_until_ready(jax.jvp(_jax_attend(lib, case, PROBE_SHAPE), (q, k, v), (q, k, v)))
  except Exception as error:  # whatever it raises is the finding
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]
  return None


def _flex_kwargs(case: str, shape) -> tuple[dict, float]:
  """flex_attention's keyword arguments for a case, and the seconds its tile map took."""
  import torch
  from torch.nn.attention.flex_attention import create_block_mask

  T = shape[1]
  if case == "softcap":

    def softcap(score, b, h, q_idx, kv_idx):
      return SOFTCAP * torch.tanh(score / SOFTCAP)

    return {"score_mod": softcap}, 0.0
  doc = torch.arange(T) // max(T // DOCUMENTS, 1)

  def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx

  def document_causal(b, h, q_idx, kv_idx):
    return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

  mask_mod = document_causal if case == "documents" else causal
  start = time.perf_counter()
  block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cpu")
  return {"block_mask": block_mask}, time.perf_counter() - start


class _NoTangent(Exception):
  """flex_attention under forward-mode AD returned an output that carries no tangent."""


def _flex_forward_mode(attend, kwargs, q, k, v, tangents):
  import torch.autograd.forward_ad as fwAD

  with fwAD.dual_level():
    duals = [fwAD.make_dual(x, t) for x, t in zip((q, k, v), tangents, strict=True)]
    out = fwAD.unpack_dual(attend(*duals, **kwargs))
    if out.tangent is None:
      raise _NoTangent("returns its output without a tangent (forward mode silently dropped)")
    return out


def _probe_flex_forward_mode(case: str) -> str | None:
  """None if forward-mode AD of compiled flex_attention works at a tiny size, else why not."""
  import torch
  from torch.nn.attention.flex_attention import flex_attention

  q, k, v, _ = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in _inputs(PROBE_SHAPE))
  kwargs, _ = _flex_kwargs(case, PROBE_SHAPE)
  reasons = []
  for name, attend in (("compiled", torch.compile(flex_attention)), ("eager", flex_attention)):
    try:
      _flex_forward_mode(attend, kwargs, q, k, v, (q, k, v))
    except _NoTangent as error:
      reasons.append(f"{name}: {error}")
    except Exception as error:  # whatever it raises is the finding
      reasons.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
    else:
      if name == "compiled":
        return None
  return "torch.autograd.forward_ad, " + "; ".join(reasons)


def _flex_step(case: str, shape, mode: str):
  """(the timed step, seconds spent building the tile map)."""
  import torch
  from torch.nn.attention.flex_attention import flex_attention

  # flex_attention takes (B, N, T, H); contiguous, as a fresh tensor would be.
  q, k, v, g = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in _inputs(shape))
  kwargs, setup_s = _flex_kwargs(case, shape)
  attend = torch.compile(flex_attention)
  if mode == "jvp":
    return (lambda: _flex_forward_mode(attend, kwargs, q, k, v, (g, q, k))), setup_s
  return _flex_run(attend, kwargs, q, k, v, g, mode), setup_s


def worker(lib: str, case: str, shape, mode: str, repeats: int) -> dict:
  """Runs one cell in this process and returns its measurements."""

  base = {"lib": lib, "case": case, "mode": mode, "shape": list(shape)}
  note = None
  setup_s = 0.0
  threads = None
  if lib in ("jattn", "tokamax"):
    import jax

    if mode == "jvp" and lib != "jattn":
      reason = _probe_jax_forward_mode(lib, case)
      if reason is not None:
        reason = f"{lib} {importlib.metadata.version(lib)}: {reason}"
        return {**base, "skipped": reason, "short": NO_FORWARD_MODE}
      note = f"{lib} jax.jvp worked in the probe: timed"
    first, times = _time(_jax_step(lib, case, shape, mode), repeats)
    version = f"jax {jax.__version__}"
    if lib == "tokamax":
      version += f", tokamax {importlib.metadata.version('tokamax')}"
  else:
    import torch

    if mode == "jvp":
      reason = _probe_flex_forward_mode(case)
      if reason is not None:
        reason = f"torch {torch.__version__} flex_attention: {reason}"
        return {**base, "skipped": reason, "short": NO_FORWARD_MODE}
      note = "flex_attention forward-mode AD worked in the probe: timed"
    run, setup_s = _flex_step(case, shape, mode)
    timed, reason = _time_flex(run, repeats)
    if reason is not None:
      return {**base, "skipped": reason, "short": NO_CPU_BACKWARD}
    first, times = timed
    version = f"torch {torch.__version__}"
    threads = torch.get_num_threads()
  record = _record(base, first, times, setup_s, version, threads)
  return {**record, **({"note": note} if note else {})}


def ring_worker(documents: bool, layout: str, shape, repeats: int) -> dict:
  """One ring configuration on RING_DEVICES simulated devices, causal forward+backward."""
  # Before JAX's CPU backend starts (nothing in this process has used it yet).
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={RING_DEVICES}"
  )
  import jax
  import jax.numpy as jnp

  import jattn
  from jattn._bench import peak_rss_mb

  if jax.device_count() < RING_DEVICES:
    raise RuntimeError(f"{jax.device_count()} devices, need {RING_DEVICES}: XLA_FLAGS too late")
  T = shape[1]
  q, k, v, g = _inputs(shape)
  seg = _documents(shape)
  if layout == "zigzag":
    order = jattn.zigzag_order(T, RING_DEVICES)
    q, k, v, g = (x[:, order] for x in (q, k, v, g))
    seg = seg[:, order]
  q, k, v, g, seg = (jnp.asarray(x) for x in (q, k, v, g, seg))
  mesh = jax.make_mesh((RING_DEVICES,), ("seq",), devices=jax.devices()[:RING_DEVICES])

  def loss(q, k, v, seg):
    out = jattn.ring_attention(
      q,
      k,
      v,
      mesh=mesh,
      axis_name="seq",
      layout=layout,
      is_causal=True,
      **({"q_segment_ids": seg} if documents else {}),
    )
    return jnp.sum(out * g)

  start = time.perf_counter()
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, seg).compile()
  compile_s = time.perf_counter() - start
  m = compiled.memory_analysis()
  first, times = _time(lambda: jax.block_until_ready(compiled(q, k, v, seg)), repeats)
  return {
    "documents": documents,
    "layout": layout,
    "shape": list(shape),
    "devices": RING_DEVICES,
    "temp_mb": m.temp_size_in_bytes / 2**20,
    "per_device_mb": (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)
    / 2**20,
    "compile_s": compile_s,
    "median_s": statistics.median(times),
    "times_s": times,
    "first_call_s": first,
    "peak_rss_mb": peak_rss_mb(),
    "version": f"jax {jax.__version__}",
  }


def _command(*args) -> list[str]:
  return [sys.executable, str(Path(__file__).resolve()), *map(str, args)]


def _shape_arg(shape) -> str:
  return ",".join(map(str, shape))


def run_cell(lib, case, shape, mode, repeats, timeout) -> dict:
  from jattn._bench import run_worker

  base = {"lib": lib, "case": case, "mode": mode, "shape": list(shape)}
  command = _command("--worker", lib, case, mode, _shape_arg(shape), repeats)
  return run_worker(command, base, timeout)


def run_ring(documents, layout, shape, repeats, timeout) -> dict:
  from jattn._bench import run_worker

  base = {"documents": documents, "layout": layout, "shape": list(shape)}
  command = _command("--ring-worker", int(documents), layout, _shape_arg(shape), repeats)
  return run_worker(command, base, timeout)


def _shape(shape) -> str:
  return "(" + ", ".join(map(str, shape)) + ")"


def _baseline(r: dict) -> tuple[str, str] | None:
  """(lib, case) whose time a cell is divided by, at the same shape and mode."""
  if r["lib"] != "jattn":
    return "jattn", r["case"]
  if r["case"] in JATTN_BASELINE:
    return "jattn", JATTN_BASELINE[r["case"]]
  return None


def _key(r: dict):
  return r["lib"], r["case"], tuple(r["shape"]), r["mode"]


def markdown(results: list[dict], ring: list[dict]) -> str:
  by = {_key(r): r for r in results}
  everything = results + ring
  versions = sorted(
    {part for r in everything if "version" in r for part in r["version"].split(", ")}
  )
  threads = {r["torch_threads"] for r in results if r.get("torch_threads")}
  lines = [
    "Attention variants on CPU, float32; "
    f"{', '.join(versions) or 'nothing ran'}"
    + (f" ({', '.join(map(str, sorted(threads)))} torch threads)" if threads else "")
    + ". Median seconds after one compile-and-warm-up call.",
  ]

  doc_shapes = sorted({tuple(r["shape"]) for r in results if r["case"] == "documents"})
  for shape in doc_shapes:
    lines += [
      "",
      f"Packed documents ({DOCUMENTS} of T/{DOCUMENTS}, causal) against plain causal, "
      f"{_shape(shape)}:",
      "",
      "| mode | jattn causal s | jattn documents s | documents / causal | target "
      "| flex causal s | flex documents s | flex documents / causal | jattn / flex documents |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
      causal, docs = (
        by.get(("jattn", "causal", shape, mode)),
        by.get(("jattn", "documents", shape, mode)),
      )
      flex_causal, flex_docs = (
        by.get(("flex", "causal", shape, mode)),
        by.get(("flex", "documents", shape, mode)),
      )
      if docs is None and causal is None:
        continue
      ratio = _ratio(docs, causal)
      goal = ""
      if mode in TARGET_MODES:
        goal = f"<= 1/6 ({TARGET:.3f}x)" + (
          "" if ratio is None else f": {'met' if ratio <= TARGET else 'missed'}"
        )
      lines.append(
        f"| {mode} | {_seconds(causal)} | {_seconds(docs)} | {_x(ratio)} | {goal} "
        f"| {_seconds(flex_causal)} | {_seconds(flex_docs)} "
        f"| {_x(_ratio(flex_docs, flex_causal))} | {_x(_ratio(docs, flex_docs))} |"
      )

  lines += [
    "",
    "Every cell:",
    "",
    "| case | shape (B, T, N, H) | mode | library | median s | ratio | divided by "
    "| first call s | tile map s | peak RSS MB |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    base = _baseline(r)
    ref = None if base is None else by.get((*base, tuple(r["shape"]), r["mode"]))
    ratio = _ratio(r, ref)
    over = "" if base is None or ratio is None else f"{base[0]} {base[1]}"
    ok = "median_s" in r
    first = f"{r['first_call_s']:.2f}" if ok else ""
    tile_map = f"{r['block_mask_s']:.2f}" if ok and r["lib"] == "flex" else ""
    rss = f"{r['peak_rss_mb']:.0f}" if ok else ""
    lines.append(
      f"| {r['case']} | {_shape(r['shape'])} | {r['mode']} | {r['lib']} | {_seconds(r)} "
      f"| {_x(ratio)} | {over} | {first} | {tile_map} | {rss} |"
    )
  lines += [
    "",
    "'ratio': the cell's time over the time it is divided by, same shape and mode. For a peer "
    "(tokamax, flex) that is jattn in the same case: above 1, jattn is faster. For jattn "
    "documents it is jattn causal: the issue's target is at most 1/6 in fwd and fwd+bwd. "
    "flex's tile map (`create_block_mask`) is built outside the timed step ('tile map s'); "
    "jattn needs none (segment ranges per tile are computed inside the call). 'first call' "
    "includes compiling.",
  ]

  if ring:
    rshape = ring[0]["shape"]
    lines += [
      "",
      f"Ring attention on {RING_DEVICES} simulated CPU devices, causal forward+backward, "
      f"{_shape(rshape)}, with and without {DOCUMENTS} documents (`q_segment_ids`). Memory: "
      "XLA's accounting of one device's compiled step (`memory_analysis()`: temporaries, "
      "and temporaries plus that device's arguments and outputs). The devices share this "
      "machine's cores, so the time is the work of all of them together.",
      "",
      "| layout | documents | temp MB / device | total MB / device | median s "
      "| documents / none | first call s | compile s | peak RSS MB |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    rby = {(r["layout"], r["documents"]): r for r in ring}
    for r in ring:
      ok = "median_s" in r
      none = rby.get((r["layout"], False))
      ratio = _ratio(r, none) if r["documents"] else None
      if not ok:
        lines.append(
          f"| {r['layout']} | {'yes' if r['documents'] else 'no'} | skipped: {r['skipped']} "
          "| | | | | | |"
        )
        continue
      lines.append(
        f"| {r['layout']} | {'yes' if r['documents'] else 'no'} | {r['temp_mb']:.1f} "
        f"| {r['per_device_mb']:.1f} | {r['median_s']:.3f} | {_x(ratio)} "
        f"| {r['first_call_s']:.2f} | {r['compile_s']:.1f} | {r['peak_rss_mb']:.0f} |"
      )

  skipped = [r for r in everything if "skipped" in r]
  notes = [r for r in results if r.get("note")]
  if skipped or notes:
    lines += ["", "Skipped and notes:", ""]
    for r in skipped:
      if "lib" in r:
        lines.append(f"- {r['lib']} {r['case']} {_shape(r['shape'])} {r['mode']}: {r['skipped']}")
      else:
        what = f"ring {r['layout']}, documents {'yes' if r['documents'] else 'no'}"
        lines.append(f"- {what}: {r['skipped']}")
    lines += [
      f"- {r['lib']} {r['case']} {_shape(r['shape'])} {r['mode']}: {r['note']}" for r in notes
    ]
  return "\n".join(lines) + "\n"


def plot(results: list[dict], ring: list[dict], modes, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  by = {_key(r): r for r in results}
  groups = list(dict.fromkeys((r["case"], tuple(r["shape"])) for r in results))
  libs = [lib for lib in LIBS if any(r["lib"] == lib for r in results)]
  panels = len(modes) + (1 if ring else 0)
  fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5), squeeze=False)
  width = 0.8 / max(len(libs), 1)
  for ax, mode in zip(axes[0], modes, strict=False):
    for n, lib in enumerate(libs):
      values = [
        by.get((lib, case, shape, mode), {}).get("median_s", math.nan) for case, shape in groups
      ]
      ax.bar([g + n * width for g in range(len(groups))], values, width, label=lib)
    ax.set_xticks(
      [g + 0.4 - width / 2 for g in range(len(groups))],
      [f"{case}\n{'x'.join(map(str, shape))}" for case, shape in groups],
      fontsize=8,
    )
    ax.set(ylabel="median time (s)", title=mode, yscale="log")
    ax.set_ylim(top=ax.get_ylim()[1] * 4)  # a log-scale headroom for the legend
    ax.legend(fontsize=8, loc="upper left", ncols=3)
  if ring:
    ax = axes[0][-1]
    labels = [f"{r['layout']}\n{'documents' if r['documents'] else 'causal'}" for r in ring]
    ax.bar(range(len(ring)), [r.get("median_s", math.nan) for r in ring], 0.4, label="time (s)")
    twin = ax.twinx()
    twin.bar(
      [i + 0.4 for i in range(len(ring))],
      [r.get("temp_mb", math.nan) for r in ring],
      0.4,
      color="tab:orange",
      label="temp MB / device",
    )
    ax.set_xticks([i + 0.2 for i in range(len(ring))], labels, fontsize=8)
    ax.set(ylabel="median time, fwd+bwd (s)", title=f"ring, {RING_DEVICES} simulated devices")
    twin.set_ylabel("temp MB per device")
    handles, labels = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    # Above the bars, not on them.
    ax.set_ylim(top=ax.get_ylim()[1] * 1.3)
    twin.set_ylim(top=twin.get_ylim()[1] * 1.3)
    twin.legend(handles + more[0], labels + more[1], fontsize=8, loc="upper center", ncols=2)
  fig.suptitle(
    "jattn variants vs tokamax and torch flex_attention, CPU float32 "
    "(missing bars: unsupported there, see variants.md)"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _parse_shape(parser, value: str, flag: str) -> tuple[int, ...]:
  try:
    shape = tuple(int(x) for x in value.split(","))
  except ValueError:
    parser.error(f"{flag} must look like 1,8192,8,64, got {value!r}")
  if len(shape) != 4 or min(shape) <= 0:
    parser.error(f"{flag} needs four positive sizes B,T,N,H, got {value!r}")
  return shape


def _available(module: str, flag: bool, row: str) -> bool:
  if flag:
    return False
  if importlib.util.find_spec(module) is None:
    print(f"{module} is not installed: the {row} cells are left out (pip install {module})")
    return False
  return True


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
  parser.add_argument("--ring-worker", nargs=4, help=argparse.SUPPRESS)
  parser.add_argument(
    "--shape",
    default=_shape_arg(DEFAULT_SHAPE),
    help="B,T,N,H of the causal, documents and ring cases (default 1,8192,8,64)",
  )
  parser.add_argument(
    "--softcap-shapes",
    default=None,
    help="semicolon-separated B,T,N,H shapes of the softcap case (default "
    "4,1024,8,64;1,8192,8,64, or --shape alone when --shape is given)",
  )
  parser.add_argument("--modes", default=",".join(MODES), help=f"from {MODES}")
  parser.add_argument(
    "--cases", default=",".join(CASES), help=f"from {CASES}; empty ('') with --ring: ring only"
  )
  parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
  parser.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
  parser.add_argument(
    "--ring",
    action="store_true",
    help=f"also measure ring attention with documents on {RING_DEVICES} simulated devices",
  )
  parser.add_argument(
    "--out",
    type=Path,
    default=Path(__file__).parent / "results",
    help="folder for variants.md, variants.json and variants.png (default benchmarks/results)",
  )
  parser.add_argument("--no-torch", action="store_true", help="leave out the flex cells")
  parser.add_argument("--no-tokamax", action="store_true", help="leave out the tokamax cells")
  args = parser.parse_args(argv)
  if args.worker or args.ring_worker:
    # tokamax defines absl flags, which would parse (and reject) this script's arguments.
    sys.argv = sys.argv[:1]
  if args.worker:
    lib, case, mode, shape, repeats = args.worker
    print(
      json.dumps(worker(lib, case, _parse_shape(parser, shape, "--worker"), mode, int(repeats)))
    )
    return 0
  if args.ring_worker:
    documents, layout, shape, repeats = args.ring_worker
    shape = _parse_shape(parser, shape, "--ring-worker")
    print(json.dumps(ring_worker(bool(int(documents)), layout, shape, int(repeats))))
    return 0
  shape = _parse_shape(parser, args.shape, "--shape")
  if args.softcap_shapes is not None:
    softcap_shapes = [
      _parse_shape(parser, s, "--softcap-shapes") for s in args.softcap_shapes.split(";") if s
    ]
  elif shape == DEFAULT_SHAPE:
    softcap_shapes = list(DEFAULT_SOFTCAP_SHAPES)
  else:
    softcap_shapes = [shape]
  modes = _parse_list(parser, args.modes, MODES, "--modes")
  cases = (
    [] if args.cases == "" and args.ring else _parse_list(parser, args.cases, CASES, "--cases")
  )
  if args.repeats < 1:
    parser.error("--repeats must be at least 1")
  if args.ring and shape[1] % (2 * RING_DEVICES):
    parser.error(f"--ring needs T to be a multiple of {2 * RING_DEVICES} (the zig-zag layout)")

  libs = {"jattn"}
  if _available("tokamax", args.no_tokamax, "tokamax"):
    libs.add("tokamax")
  if _available("torch", args.no_torch, "flex"):
    libs.add("flex")

  results = []
  for case in cases:
    for case_shape in softcap_shapes if case == "softcap" else [shape]:
      for mode in modes:
        for lib in CASE_LIBS[case]:
          if lib not in libs:
            continue
          r = run_cell(lib, case, case_shape, mode, args.repeats, args.timeout)
          results.append(r)
          done = r.get("skipped") or (
            f"{r['median_s']:.3f} s (first call {r['first_call_s']:.1f} s, "
            f"peak RSS {r['peak_rss_mb']:.0f} MB)" + (f"; {r['note']}" if r.get("note") else "")
          )
          print(f"{lib:7} {case:9} {_shape(case_shape):17} {mode:7} {done}", flush=True)

  ring = []
  if args.ring:
    for layout in LAYOUTS:
      for documents in (False, True):
        r = run_ring(documents, layout, shape, args.repeats, args.timeout)
        ring.append(r)
        done = r.get("skipped") or (
          f"{r['median_s']:.3f} s, temp {r['temp_mb']:.1f} MB/device "
          f"(first call {r['first_call_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB)"
        )
        print(f"ring {layout:10} documents={documents!s:5} {done}", flush=True)

  table = markdown(results, ring)
  print()
  print(table)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "variants.md").write_text(table)
  summary = {
    "shape": list(shape),
    "softcap_shapes": [list(s) for s in softcap_shapes],
    "repeats": args.repeats,
    "results": results,
    "ring": ring,
  }
  (args.out / "variants.json").write_text(json.dumps(summary, indent=1))
  plot(results, ring, modes, args.out / "variants.png")
  print(f"wrote {args.out}/variants.md, variants.json and variants.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
