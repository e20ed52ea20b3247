"""Ring attention over however many devices (and processes) JAX is given.

One process, simulated CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/ring_attention.py

Several processes (each with its devices), e.g. two on one machine:

    A="--num-processes 2 --coordinator 127.0.0.1:1234"
    python examples/ring_attention.py --process-id 0 $A &
    python examples/ring_attention.py --process-id 1 $A

On a GPU or TPU cluster, run one process per host with the same --coordinator (or none: on
Cloud TPU and SLURM `jax.distributed.initialize()` finds its peers) and leave XLA_FLAGS alone.
"""

import argparse
import time

import jax


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=8192, help="sequence length (default 8192)")
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--coordinator", help="host:port of process 0")
  args = parser.parse_args()
  if args.num_processes:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only on CPU
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import jattn

  devices = jax.device_count()
  mesh = jax.make_mesh((devices,), ("seq",))
  T = -(-args.tokens // devices) * devices  # a global array must shard evenly
  shape = (1, T, args.heads, args.head_dim)
  spec = NamedSharding(mesh, P(None, "seq", None, None))
  q, k, v = (
    jax.make_array_from_callback(
      shape, spec, lambda index, i=i: jax.random.normal(jax.random.key(i), shape)[index]
    )
    for i in range(3)
  )

  def loss(q, k, v):
    out = jattn.ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=True)
    return jnp.mean(out**2)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  compiled = step.lower(q, k, v).compile()
  memory = compiled.memory_analysis()
  value, grads = step(q, k, v)
  jax.block_until_ready(grads)
  start = time.perf_counter()
  value, grads = step(q, k, v)
  jax.block_until_ready(grads)
  elapsed = time.perf_counter() - start
  if jax.process_index() == 0:
    print(
      f"ring attention, causal, {T} tokens x {args.heads} heads x {args.head_dim} over "
      f"{mesh.size} devices in {jax.process_count()} process(es): loss {float(value):.6f}, "
      f"forward+backward {elapsed * 1e3:.0f} ms, "
      f"{memory.temp_size_in_bytes / 2**20:.1f} MB of temporaries per device"
    )
  if args.num_processes:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
