"""Mask helpers: booleans, shapes, alignment, and agreement with what they claim."""

import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_array_equal

import jattn


def test_helpers_return_booleans():
  for m in (
    jattn.causal_mask(3),
    jattn.sliding_window_mask(4, window=1),
    jattn.padding_mask(jnp.array([1, 2]), 3),
    jattn.combine_masks(jattn.causal_mask(3), jattn.causal_mask(3)),
  ):
    assert m.dtype == jnp.bool_


def test_causal_equals_lower_triangle_for_square():
  assert_array_equal(jattn.causal_mask(5), np.tril(np.ones((5, 5), bool)))
  assert_array_equal(jattn.causal_mask(5, alignment="top_left"), np.tril(np.ones((5, 5), bool)))


def test_bottom_right_is_the_last_rows_of_the_square_mask():
  full = np.tril(np.ones((6, 6), bool))
  for T in range(1, 7):
    assert_array_equal(jattn.causal_mask(T, 6), full[-T:])
    assert_array_equal(jattn.causal_mask(T, 6, alignment="top_left"), full[:T])


def test_sliding_window_bands():
  m = np.asarray(jattn.sliding_window_mask(6, window=(2, 1)))
  i, j = np.indices((6, 6))
  assert_array_equal(m, (j >= i - 2) & (j <= i + 1))
  causal_local = jattn.sliding_window_mask(6, window=(2, 1), is_causal=True)
  assert_array_equal(causal_local, (j >= i - 2) & (j <= i))


def test_padding_mask_shapes_and_values():
  m = jattn.padding_mask(jnp.array([[1, 3], [2, 0]]), 3)
  assert m.shape == (2, 2, 1, 1, 3)
  assert_array_equal(m[..., 0, 0, :], [[[1, 0, 0], [1, 1, 1]], [[1, 1, 0], [0, 0, 0]]])
  m = jattn.padding_mask(jnp.array([3, 1]), 4, q_lengths=jnp.array([2, 1]), q_len=2)
  assert m.shape == (2, 1, 2, 4)
  assert_array_equal(m[1, 0], [[1, 0, 0, 0], [0, 0, 0, 0]])


def test_combine_masks():
  assert jattn.combine_masks(None, None) is None
  a = jnp.array([[True, False]])
  b = jnp.array([[True], [False]])
  assert_array_equal(jattn.combine_masks(a, None, b), [[1, 0], [0, 0]])
  with pytest.raises(TypeError, match="boolean"):
    jattn.combine_masks(a, jnp.ones((1, 2)))
  with pytest.raises(ValueError, match=r"\(1, 2\), \(3,\) do not broadcast"):
    jattn.combine_masks(a, jnp.ones((3,), bool))


@pytest.mark.parametrize(
  "call, error, match",
  [
    (lambda: jattn.causal_mask(0), ValueError, "q_len must be positive"),
    (lambda: jattn.causal_mask(2.5), TypeError, "q_len must be a Python int"),
    (lambda: jattn.causal_mask(2, alignment="middle"), ValueError, "alignment must be one of"),
    (lambda: jattn.sliding_window_mask(3, window=(1, 2, 3)), TypeError, "pair of ints"),
    (lambda: jattn.padding_mask(jnp.array([1.5]), 3), TypeError, "integers"),
    (lambda: jattn.padding_mask(jnp.array([1]), 3, q_lengths=jnp.array([1])), ValueError, "q_len"),
  ],
)
def test_mask_errors(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_masks_feed_dot_product_attention():
  rng = np.random.default_rng(1)
  q = k = v = jnp.asarray(rng.standard_normal((2, 4, 1, 3)), jnp.float32)
  lengths = jnp.array([2, 4])
  by_helper = jattn.dot_product_attention(
    q, k, v, mask=jattn.combine_masks(jattn.causal_mask(4), jattn.padding_mask(lengths, 4))
  )
  by_option = jattn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths)
  assert_array_equal(by_helper, by_option)
