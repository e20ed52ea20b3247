"""jattn: self-attention as pure, composable JAX functions over a parameter pytree.

Import the public names from here; the ``jattn._*`` modules are private.
"""

from jattn._attention import attention as attention
from jattn._attention import explain as explain
from jattn._attention import self_attention as self_attention
from jattn._blockwise import block_mask as block_mask
from jattn._decode import decode_step as decode_step
from jattn._decode import init_cache as init_cache
from jattn._dot_product import attention_stats as attention_stats
from jattn._dot_product import attention_weights as attention_weights
from jattn._dot_product import dot_product_attention as dot_product_attention
from jattn._masks import BlockMask as BlockMask
from jattn._masks import alibi_slopes as alibi_slopes
from jattn._masks import causal_mask as causal_mask
from jattn._masks import combine_masks as combine_masks
from jattn._masks import padding_mask as padding_mask
from jattn._masks import sliding_window_mask as sliding_window_mask
from jattn._naive import attention_scores as attention_scores
from jattn._naive import masked_logsumexp as masked_logsumexp
from jattn._naive import masked_softmax as masked_softmax
from jattn._naive import weighted_sum as weighted_sum
from jattn._params import INITIALIZER_NAMES as INITIALIZER_NAMES
from jattn._params import get_initializer as get_initializer
from jattn._params import init as init
from jattn._ring import Ring as Ring
from jattn._ring import ring_attention as ring_attention
from jattn._ring import zigzag_order as zigzag_order
from jattn._spec import IMPLEMENTATIONS as IMPLEMENTATIONS
from jattn._walkthrough import walkthrough_example as walkthrough_example

__version__ = "0.1.0"

__all__ = (
  "IMPLEMENTATIONS",
  "INITIALIZER_NAMES",
  "BlockMask",
  "Ring",
  "alibi_slopes",
  "attention",
  "attention_scores",
  "attention_stats",
  "attention_weights",
  "block_mask",
  "causal_mask",
  "combine_masks",
  "decode_step",
  "dot_product_attention",
  "explain",
  "get_initializer",
  "init",
  "init_cache",
  "masked_logsumexp",
  "masked_softmax",
  "padding_mask",
  "ring_attention",
  "self_attention",
  "sliding_window_mask",
  "walkthrough_example",
  "weighted_sum",
  "zigzag_order",
)
