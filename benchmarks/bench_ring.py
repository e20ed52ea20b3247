"""Ring attention: per-device memory and time against sequence length on 1, 2, 4, 8 devices.

    python benchmarks/bench_ring.py        # writes benchmarks/results/ring.{md,json,png}

Runs on 8 simulated CPU devices (it sets XLA_FLAGS itself). Memory is XLA's own accounting
of one device's program for causal forward+backward (`memory_analysis()`: temporaries plus
that device's shard of the arguments and outputs), from compiling alone, so every length is
cheap to measure. Time is measured at one length only: the simulated devices share this
machine's cores, so it shows the ring's overhead, not a speed-up.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import jattn

DEVICES = (1, 2, 4, 8)


def step_fn(mesh):
  def loss(q, k, v):
    out = jattn.ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=True)
    return jnp.mean(out**2)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="4096,8192,16384,32768,65536")
  parser.add_argument("--time-length", type=int, default=4096)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
  args = parser.parse_args()
  N, H = args.heads, args.head_dim
  rows = []
  for T in map(int, args.lengths.split(",")):
    shape = jax.ShapeDtypeStruct((1, T, N, H), jnp.float32)
    for P in DEVICES:
      mesh = jax.make_mesh((P,), ("seq",), devices=jax.devices()[:P])
      m = step_fn(mesh).lower(shape, shape, shape).compile().memory_analysis()
      per_device = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
      row = {"tokens": T, "devices": P, "mb_per_device": per_device / 2**20}
      if T == args.time_length:
        q, k, v = (jax.random.normal(jax.random.key(i), (1, T, N, H)) for i in range(3))
        f = step_fn(mesh)
        jax.block_until_ready(f(q, k, v))
        times = []
        for _ in range(3):
          start = time.perf_counter()
          jax.block_until_ready(f(q, k, v))
          times.append(time.perf_counter() - start)
        row["ms"] = sorted(times)[1] * 1e3
      rows.append(row)
      print(row, flush=True)

  lines = [
    f"Ring attention, causal forward+backward, (1, T, {N}, {H}) float32, on simulated CPU "
    "devices. Memory: XLA's per-device accounting (temporaries + that device's arguments and "
    "outputs).",
    "",
    "| tokens | " + " | ".join(f"MB/device, P={P}" for P in DEVICES) + " | P=8 vs P=1 |",
    "|---|" + "---|" * (len(DEVICES) + 1),
  ]
  for T in sorted({r["tokens"] for r in rows}):
    mb = {r["devices"]: r["mb_per_device"] for r in rows if r["tokens"] == T}
    cells = " | ".join(f"{mb[P]:.1f}" for P in DEVICES)
    lines.append(f"| {T} | {cells} | {mb[8] / mb[1]:.3f} |")
  timed = [r for r in rows if "ms" in r]
  if timed:
    lines += [
      "",
      f"Time at {args.time_length} tokens (median of 3; the simulated devices share the "
      "host's cores, so this is the ring's overhead, not a speed-up):",
      "",
      "| devices | ms | vs 1 device |",
      "|---|---|---|",
    ]
    base = next(r["ms"] for r in timed if r["devices"] == 1)
    lines += [f"| {r['devices']} | {r['ms']:.0f} | {r['ms'] / base:.2f}x |" for r in timed]
  table = "\n".join(lines) + "\n"
  print(table)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "ring.md").write_text(table)
  (args.out / "ring.json").write_text(json.dumps(rows, indent=1))

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for P in DEVICES:
    pts = [(r["tokens"], r["mb_per_device"]) for r in rows if r["devices"] == P]
    ax.plot(*zip(*pts, strict=True), marker="o", label=f"{P} device{'s' * (P > 1)}")
  ax.set(
    xscale="log",
    yscale="log",
    xlabel="tokens",
    ylabel="MB per device",
    title="ring attention: memory per device (causal fwd+bwd)",
  )
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.out / "ring.png", dpi=100)


if __name__ == "__main__":
  main()
