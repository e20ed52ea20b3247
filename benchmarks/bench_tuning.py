"""The measurements behind the blockwise path's defaults: tile sizes and the "auto" threshold.

    python benchmarks/bench_tuning.py          # ~5 min on 2 cores; writes results/tuning.{md,json}
    python benchmarks/bench_tuning.py --quick  # the auto threshold only

Two tables, each timed side by side in one process (float32, medians after a warm-up call):

- **Tiles.** ``(block_q, block_kv)`` against the default rule of
  ``jattn._blockwise.default_blocks`` on the issue's shapes, forward and
  forward+backward (the gradient of ``sum(out * g)``), plain and causal: each
  configuration's time over the default's (below 1: faster than the default).
- **Auto threshold.** jattn's naive path against its blockwise path on square
  ``(4, T, 8, 64)`` problems of growing ``T``: the naive time over the blockwise one
  (above 1: blockwise is faster). ``implementation="auto"`` takes blockwise from
  ``T * S >= jattn._spec.AUTO_BLOCKWISE_MIN_SCORES``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp

import jattn
from jattn._bench import _time
from jattn._blockwise import default_blocks
from jattn._spec import AUTO_BLOCKWISE_MIN_SCORES

# (shape, causal, configurations (block_q, block_kv) to time against the default)
TILE_CASES = (
  ((4, 1024, 8, 64), False, ((128, 1024), (256, 1024), (512, 1024), (256, 512))),
  ((1, 8192, 8, 64), False, ((128, 8192), (256, 8192), (1024, 8192), (512, 4096), (512, 2048))),
  ((1, 8192, 8, 64), True, ((256, 512), (512, 1024), (1024, 1024), (256, 2048))),
)
LENGTHS = (64, 128, 256, 512, 1024)


def median_ms(fn, args, repeats: int) -> float:
  """Median of ``repeats`` calls of ``fn(*args)``, after a compile-and-warm-up call."""
  return 1e3 * statistics.median(_time(lambda: jax.block_until_ready(fn(*args)), repeats))


def step(mode: str, **options):
  attend = lambda q, k, v: jattn.dot_product_attention(q, k, v, **options)  # noqa: E731
  if mode == "fwd":
    return jax.jit(attend)
  loss = lambda q, k, v, g: jnp.sum(attend(q, k, v) * g)  # noqa: E731
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def inputs(shape, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return tuple(jax.random.normal(key, shape, jnp.float32) for key in keys)


def tiles(repeats: int) -> list[dict]:
  rows = []
  for shape, causal, configs in TILE_CASES:
    q, k, v, g = inputs(shape)
    T = shape[1]
    default = default_blocks(T, T, structured=causal)
    for mode in ("fwd", "fwd+bwd"):
      args = (q, k, v) if mode == "fwd" else (q, k, v, g)
      opts = dict(implementation="blockwise", is_causal=causal)
      base = median_ms(step(mode, **opts), args, repeats)
      rows.append(
        dict(shape=shape, causal=causal, mode=mode, blocks=default, ms=base, default=True)
      )
      for bq, bk in configs:
        ms = median_ms(step(mode, block_q=bq, block_kv=bk, **opts), args, repeats)
        again = median_ms(step(mode, **opts), args, repeats)  # the default, re-timed beside it
        rows.append(
          dict(shape=shape, causal=causal, mode=mode, blocks=(bq, bk), ms=ms, default_ms=again)
        )
  return rows


def threshold(lengths, repeats: int) -> list[dict]:
  rows = []
  for T in lengths:
    q, k, v, g = inputs((4, T, 8, 64), seed=T)
    for mode in ("fwd", "fwd+bwd"):
      args = (q, k, v) if mode == "fwd" else (q, k, v, g)
      naive, blockwise = (
        median_ms(step(mode, implementation=impl), args, repeats) for impl in ("naive", "blockwise")
      )
      rows.append({"T": T, "mode": mode, "naive_ms": naive, "blockwise_ms": blockwise})
  return rows


def tiles_table(rows) -> str:
  lines = [
    "Tile sizes: each configuration's median time over the default rule's, timed beside it "
    "(below 1: faster than the default).",
    "",
    "| shape (B, T, N, H) | mask | mode | (block_q, block_kv) | median ms | vs default |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    mask = "causal" if r["causal"] else "none"
    blocks = f"({r['blocks'][0]}, {r['blocks'][1]})"
    if r.get("default"):
      ratio, blocks = "1.00 (default)", blocks + " default"
    else:
      ratio = f"{r['ms'] / r['default_ms']:.2f}"
    shape = tuple(r["shape"])
    lines.append(f"| {shape} | {mask} | {r['mode']} | {blocks} | {r['ms']:.0f} | {ratio} |")
  return "\n".join(lines) + "\n"


def threshold_table(rows) -> str:
  lines = [
    "Auto threshold: jattn naive vs blockwise on (4, T, 8, 64) float32 "
    "(above 1: blockwise is faster).",
    f'"auto" takes blockwise from T * S >= {AUTO_BLOCKWISE_MIN_SCORES:,}.',
    "",
    "| T = S | mode | naive ms | blockwise ms | naive / blockwise | auto picks |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    pick = "blockwise" if r["T"] ** 2 >= AUTO_BLOCKWISE_MIN_SCORES else "naive"
    lines.append(
      f"| {r['T']} | {r['mode']} | {r['naive_ms']:.2f} | {r['blockwise_ms']:.2f} | "
      f"{r['naive_ms'] / r['blockwise_ms']:.2f}x | {pick} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="the auto threshold table only")
  parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
  args = parser.parse_args(argv)
  lengths = tuple(int(t) for t in args.lengths.split(","))
  auto = threshold(lengths, max(args.repeats, 10))
  tile_rows = [] if args.quick else tiles(args.repeats)
  text = threshold_table(auto) + ("" if args.quick else "\n" + tiles_table(tile_rows))
  print(text)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "tuning.md").write_text(text)
  (args.out / "tuning.json").write_text(
    json.dumps({"auto": auto, "tiles": tile_rows}, indent=1, default=list)
  )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
