"""bfloat16 and float16 inputs: every path computes in float32 and rounds once, at the end.

Rounding the float32 result once puts it within half a unit in the last place (ulp) of the
exact answer; rounding the weights to the value dtype before they multiply the values (as
jax.nn does) adds a little. A path that rounds its scores, or carries its softmax sums
from one key tile to the next, in the input dtype is many ulps off on the problem below.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn

S = 512  # keys
BLOCK_KV = 2  # 256 key tiles: a sum carried in the input dtype stalls


@functools.cache
def problem(dtype):
  """Inputs ``x (2, S, 7)`` (query, key and value features side by side) and the exact output
  ``(2,)`` of the last position attending all ``S`` (scale 1).

  Batch element 0 is flat: every score lies in [0, 1/64], so the softmax sum grows to
  about ``S`` by many small steps. In batch element 1 two keys dominate: their scores
  ``C + 0.71875`` and ``C + 0.765625`` are 0.047 apart in float32 but 0.5 apart once
  rounded to ``dtype`` (whose ulp at ``C`` is 0.5), which moves the output by ~14 ulps.
  """
  C = {jnp.bfloat16: 96.0, jnp.float16: 768.0}[dtype]
  rng = np.random.default_rng(0)
  x = np.zeros((2, S, 7))
  x[0, :, :3] = [0, 0, 1 / 64]  # queries
  x[1, :, :3] = [1, 1, 0]
  x[:, :, 3] = C  # keys
  x[:, :, 4] = -32
  x[:, :, 5] = rng.uniform(0, 1, S)
  x[:, :, 6] = rng.uniform(1, 2, S)  # values
  two = [S // 5, S - 3]
  x[:, two, 4] = [0.71875, 0.765625]
  x[:, two, 6] = [1.0, 1.9375]
  x = np.asarray(jnp.asarray(x, dtype), np.float64)  # exactly what the paths see
  scores = np.einsum("bh,bsh->bs", x[:, -1, :3], x[:, :, 3:6])
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  exact = np.einsum("bs,bs->b", weights / weights.sum(-1, keepdims=True), x[:, :, 6])
  return jnp.asarray(x, dtype), exact


def qkv(x):
  return x[:, -1:, None, :3], x[:, :, None, 3:6], x[:, :, None, 6:]  # T = 1, N = K = 1


def decoded(x, **opts):
  """Prefill the first ``S - 1`` positions into a cache, then decode the last one."""
  pick = lambda lo, hi: {"kernel": jnp.eye(7, dtype=x.dtype)[:, None, lo:hi]}  # noqa: E731
  params = {"query": pick(0, 3), "key": pick(3, 6), "value": pick(6, 7)}
  cache = jattn.init_cache(params, (2,), S, dtype=x.dtype)
  _, cache = jattn.decode_step(params, cache, x[:, :-1], scale=1.0, **opts)
  return jattn.decode_step(params, cache, x[:, -1:], scale=1.0, **opts)[0]


PATHS = {
  "naive": lambda x: jattn.dot_product_attention(*qkv(x), scale=1.0, implementation="naive"),
  "blockwise": lambda x: jattn.dot_product_attention(
    *qkv(x), scale=1.0, implementation="blockwise", block_kv=BLOCK_KV
  ),
  "ring": lambda x: jattn.ring_attention(
    *qkv(x), mesh=jax.make_mesh((1,), ("seq",)), axis_name="seq", scale=1.0, block_kv=BLOCK_KV
  ),
  "decode naive": lambda x: decoded(x, implementation="naive"),
  "decode blockwise": lambda x: decoded(x, implementation="blockwise", block_kv=BLOCK_KV),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_is_within_one_ulp_of_the_exact_answer(path, dtype):
  x, exact = problem(dtype)
  # Without this XLA:CPU may keep in float32 what the program rounds to x.dtype (excess
  # precision), hiding a rounding that other backends do; test the program as written.
  fn = jax.jit(PATHS[path], compiler_options={"xla_allow_excess_precision": False})
  out = fn(x)
  assert out.dtype == dtype
  out = np.asarray(out, np.float64).reshape(2)
  ulp = 2.0 ** (np.floor(np.log2(exact)) - jnp.finfo(dtype).nmant)
  errors = np.abs(out - exact) / ulp
  assert np.all(errors <= 1.0), f"{errors} ulps off (flat, two keys)"
