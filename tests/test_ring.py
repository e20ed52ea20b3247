"""Ring attention: single-device checks here; 8 simulated devices and 2 OS processes in
subprocesses, since the device count is fixed when JAX starts."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal

import jattn

HERE = Path(__file__).resolve().parent
MULTIDEVICE = HERE / "multidevice"


def env_with_devices(count: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.mark.slow
def test_on_eight_simulated_devices():
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      "-q",
      "-p",
      "no:cacheprovider",
      "-x",
      "-n",
      "0",  # one process: it already shares the machine with the outer run's workers
      str(MULTIDEVICE / "ring_cases.py"),
    ],
    env=env_with_devices(8),
    capture_output=True,
    text=True,
    timeout=540,
    cwd=HERE.parent,
  )
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
  assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_joined_by_jax_distributed():
  port, processes = free_port(), []
  try:
    for process_id in range(2):
      processes.append(
        subprocess.Popen(
          [sys.executable, str(MULTIDEVICE / "ring_process.py"), str(process_id), "2", str(port)],
          env=env_with_devices(4),
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
        )
      )
    outputs = [p.communicate(timeout=240)[0] for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  for process_id, (p, output) in enumerate(zip(processes, outputs, strict=True)):
    assert p.returncode == 0, output[-4000:]
    assert f"OK process {process_id}/2: 4 local of 8 devices, 16 shards checked" in output


def test_one_device_ring_equals_blockwise_in_both_modes(rng):
  mesh = jax.make_mesh((1,), ("seq",))
  q, k, v = (normal(rng, (2, 9, 2, 4)) for _ in range(3))
  ring = jattn.ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=True)
  np.testing.assert_allclose(ring, jattn.dot_product_attention(q, k, v, is_causal=True), atol=1e-6)
  tangent = jax.jvp(
    lambda q: jattn.ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=True), (q,), (k,)
  )[1]
  want = jax.jvp(lambda q: jattn.dot_product_attention(q, k, v, is_causal=True), (q,), (k,))[1]
  np.testing.assert_allclose(tangent, want, atol=1e-5)


def test_ring_option_errors(rng):
  mesh = jax.make_mesh((1,), ("seq",))
  q, k, v = (normal(rng, (2, 4, 2, 4)) for _ in range(3))
  ring = jattn.Ring(mesh, "seq")
  with pytest.raises(ValueError, match="return_weights"):
    jattn.dot_product_attention(q, k, v, implementation=ring, return_weights=True)
  with pytest.raises(ValueError, match="dropout"):
    jattn.dot_product_attention(
      q, k, v, implementation=ring, dropout_rate=0.1, dropout_rng=jax.random.key(0)
    )
  with pytest.raises(ValueError, match="must be another axis"):
    jattn.ring_attention(q, k, v, mesh=mesh, axis_name="seq", batch_axis="seq")
  with pytest.raises(ValueError, match="leading batch"):
    jattn.ring_attention(
      q[0], k[0], v[0], mesh=jax.make_mesh((1, 1), ("d", "seq")), axis_name="seq", batch_axis="d"
    )
  with pytest.raises(TypeError, match="static scale"):
    jax.jit(lambda s: jattn.ring_attention(q, k, v, mesh=mesh, axis_name="seq", scale=s))(
      jnp.float32(0.5)
    )


def test_zigzag_order_pairs_early_and_late_chunks():
  np.testing.assert_array_equal(jattn.zigzag_order(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
  order = jattn.zigzag_order(48, 8)
  np.testing.assert_array_equal(np.sort(order), np.arange(48))  # a permutation
  with pytest.raises(ValueError, match="multiple of 2 \\* 4"):
    jattn.zigzag_order(12, 4)
  with pytest.raises(ValueError, match="layout must be one of"):
    jattn.ring_attention(
      *(np.ones((4, 1, 2), np.float32),) * 3,
      mesh=jax.make_mesh((1,), ("seq",)),
      axis_name="seq",
      layout="spiral",
    )


def causal_work_per_step(order, P):
  """Visible causal (query, key) pairs of device d at ring step s, from the definition: d's
  queries against the keys of device (d - s) mod P, whose block it holds at that step."""
  held = np.asarray(order).reshape(P, -1)  # the positions each device holds
  return np.array(
    [[np.sum(held[d][:, None] >= held[(d - s) % P][None, :]) for d in range(P)] for s in range(P)]
  )


@pytest.mark.parametrize("P", [2, 4, 8])
def test_zigzag_gives_every_device_the_same_causal_work_at_every_ring_step(P):
  T = 8 * P
  zigzag = causal_work_per_step(jattn.zigzag_order(T, P), P)
  assert np.all(zigzag == zigzag[:, :1])  # each step: the same work on every device
  assert zigzag.sum() == T * (T + 1) // 2  # every visible pair once
  contiguous = causal_work_per_step(np.arange(T), P)
  assert contiguous[0].tolist() == [36] * P  # the diagonal block: 8 * 9 / 2 pairs each
  assert contiguous[1:, 0].tolist() == [0] * (P - 1)  # device 0 then idles
