"""Flax's attention modules against jattn's drop-ins: same arguments, same variables.

    python benchmarks/bench_modules.py                 # writes benchmarks/results/modules.{md,json}
    python benchmarks/bench_modules.py --shapes 2,256,128,4 --repeats 3 --out /tmp/modules

CPU, float32. A shape ``B,T,F,N`` is inputs ``(B, T, F)`` and ``num_heads=N`` with Flax's
defaults (``qkv_features=F``, biases, an out projection back to ``F``), self-attention,
no mask. The same variables go into ``flax.linen.MultiHeadDotProductAttention`` and
``jattn.linen.MultiHeadDotProductAttention`` (and ``flax.nnx.MultiHeadAttention`` /
``jattn.nnx.MultiHeadAttention``): the change a user makes is the class name only.

"fwd" is ``apply`` under ``jax.jit``; "fwd+bwd" the gradient of ``sum(out * g)`` with
respect to the params and the inputs. Times are the median of ``--repeats`` calls after one
call that compiles; "temp MB" is XLA's temporary memory of the compiled fwd+bwd
(``memory_analysis().temp_size_in_bytes``), the part that grows with ``T^2`` when the
``(B, N, T, T)`` scores are materialised. All cases run in this one process, side by side,
so the ratios are what to read: absolute times on a shared machine vary.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jattn.linen
import jattn.nnx
from jattn._bench import _time

RESULTS = Path(__file__).resolve().parent / "results"


def _median_s(fn, *args, repeats):
  return statistics.median(_time(lambda: jax.block_until_ready(fn(*args)), repeats))


def _steps(apply, variables, x):
  """Jitted forward and forward+backward of ``apply(variables, x)``."""
  g = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape).astype(np.float32))
  forward = jax.jit(apply)
  backward = jax.jit(jax.grad(lambda v, x: jnp.sum(apply(v, x) * g), argnums=(0, 1)))
  return forward, backward


def _linen(module_cls, N, variables):
  module = module_cls(num_heads=N)
  return lambda v, x: module.apply(v, x)


def _nnx(module):
  graphdef, state = nnx.split(module)
  return (lambda s, x: nnx.merge(graphdef, s)(x)), state


def measure(shape, repeats):
  B, T, F, N = shape
  x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, F)).astype(np.float32))
  variables = flax.linen.MultiHeadDotProductAttention(num_heads=N).init(jax.random.key(0), x)
  cases = {
    "flax.linen": (_linen(flax.linen.MultiHeadDotProductAttention, N, variables), variables),
    "jattn.linen": (_linen(jattn.linen.MultiHeadDotProductAttention, N, variables), variables),
  }
  for name, cls, kwargs in (
    ("flax.nnx", nnx.MultiHeadAttention, dict(decode=False)),
    ("jattn.nnx", jattn.nnx.MultiHeadAttention, {}),
  ):
    cases[name] = _nnx(cls(N, F, rngs=nnx.Rngs(0), **kwargs))
  rows = []
  for name, (apply, state) in cases.items():
    forward, backward = _steps(apply, state, x)
    memory = backward.lower(state, x).compile().memory_analysis()
    rows.append(
      dict(
        shape=list(shape),
        module=name,
        fwd_s=_median_s(forward, state, x, repeats=repeats),
        fwd_bwd_s=_median_s(backward, state, x, repeats=repeats),
        temp_mb=memory.temp_size_in_bytes / 2**20 if memory is not None else None,
      )
    )
    print(rows[-1], flush=True)
  return rows


def table(rows):
  lines = [
    "| B, T, F, N | module | fwd ms | fwd+bwd ms | fwd+bwd temp MB | vs Flax (fwd / fwd+bwd) |",
    "|---|---|---|---|---|---|",
  ]
  for row in rows:
    flax_name = "flax." + row["module"].split(".")[1]
    ref = next(r for r in rows if r["module"] == flax_name and r["shape"] == row["shape"])
    ratio = f"{ref['fwd_s'] / row['fwd_s']:.2f}x / {ref['fwd_bwd_s'] / row['fwd_bwd_s']:.2f}x"
    temp = "n/a" if row["temp_mb"] is None else f"{row['temp_mb']:.0f}"
    lines.append(
      f"| {', '.join(map(str, row['shape']))} | {row['module']} | {1e3 * row['fwd_s']:.1f} | "
      f"{1e3 * row['fwd_bwd_s']:.1f} | {temp} | {ratio} |"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="4,1024,512,8;1,4096,512,8", help="B,T,F,N;...")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", type=Path, default=RESULTS / "modules")
  args = parser.parse_args()
  shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
  rows = [row for shape in shapes for row in measure(shape, args.repeats)]
  text = table(rows)
  print(text)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
  header = f"# Flax modules vs jattn's drop-ins (jax {jax.__version__}, CPU float32)\n\n"
  args.out.with_suffix(".md").write_text(header + text + "\n")


if __name__ == "__main__":
  main()
