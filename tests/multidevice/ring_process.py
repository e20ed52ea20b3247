"""One of several OS processes joined by jax.distributed: ring attention over the global mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
      python tests/multidevice/ring_process.py PROCESS_ID NUM_PROCESSES PORT

Every process builds the same inputs from a seed, runs ring attention (and its gradient)
with the sequence sharded over all processes' devices, checks the shards it holds against
single-process attention on the full inputs, and prints OK.
"""

import sys

import jax


def main(process_id: int, num_processes: int, port: int) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=60,
  )
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import jattn

  mesh = jax.make_mesh((jax.device_count(),), ("seq",))
  r = np.random.default_rng(0)
  T, N, H = 6 * jax.device_count(), 4, 8  # a global array shards evenly
  full = [r.standard_normal((2, T, N, H)).astype(np.float32) for _ in range(3)]
  spec = NamedSharding(mesh, P(None, "seq", None, None))
  sharded = [jax.make_array_from_callback(a.shape, spec, lambda index, a=a: a[index]) for a in full]

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)

  def ring(q, k, v):
    return jattn.ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=True)

  out = jax.jit(ring)(*sharded)
  grads = jax.jit(jax.grad(loss(ring), argnums=(0, 1, 2)))(*sharded)
  local = [jnp.asarray(a) for a in full]
  ref = jattn.dot_product_attention(*local, is_causal=True, implementation="naive")
  ref_grads = jax.grad(
    loss(
      lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=True, implementation="naive")
    ),
    argnums=(0, 1, 2),
  )(*local)
  checked = 0
  for got, want in [(out, ref), *zip(grads, ref_grads, strict=True)]:
    for shard in got.addressable_shards:
      np.testing.assert_allclose(shard.data, np.asarray(want)[shard.index], atol=1e-5, rtol=1e-5)
      checked += 1
  print(
    f"OK process {process_id}/{num_processes}: {jax.local_device_count()} local of "
    f"{jax.device_count()} devices, {checked} shards checked",
    flush=True,
  )
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*(int(a) for a in sys.argv[1:4]))
