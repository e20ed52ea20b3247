"""Load and export weights of PyTorch's and Equinox's multi-head attention.

jattn's pytree (see :func:`jattn.init`) holds the same numbers as
``torch.nn.MultiheadAttention`` and ``equinox.nn.MultiheadAttention``, laid out
differently. These functions move weights between them, so that
:func:`jattn.attention` with the converted pytree computes the same outputs::

  jattn                      torch (E = N * H)                   equinox
  query kernel (F, N, H)     in_proj_weight[:E]   q_proj_weight  query_proj.weight (N*H, F)
  key kernel   (Fkv, N, H)   in_proj_weight[E:2E] k_proj_weight  key_proj.weight (N*H, Fkv)
  value kernel (Fkv, N, D)   in_proj_weight[2E:]  v_proj_weight  value_proj.weight (N*D, Fkv)
  out kernel   (N, D, O)     out_proj.weight (E, E)              output_proj.weight (O, N*D)

  F  query input features     Fkv  key/value input features     O  output features
  N  heads                    H    query/key head size          D  value head size

Both libraries store a projection as a ``(out, in)`` matrix whose rows are
head-major: rows ``n * H : (n + 1) * H`` are head ``n``. So a jattn kernel is
``W.T.reshape(F, N, H)`` and the output kernel ``W_o.T.reshape(N, D, O)``. Both
scale the logits by ``1 / sqrt(H)``, jattn's default.

Neither torch nor equinox is a dependency of jattn: they are imported only by the
functions that need them. :func:`from_torch` also reads a plain mapping of NumPy
arrays, and :func:`to_torch` returns one, so a state dict round trip needs no
torch at all.

Examples:
  >>> import jax, numpy as np, jattn
  >>> from jattn import convert
  >>> p = jattn.init(jax.random.key(0), 8, 4, num_heads=2, out_features=8, use_bias=True)
  >>> state = convert.to_torch(p)  # torch.nn.MultiheadAttention(8, 2)'s state dict
  >>> for key, value in state.items():
  ...   print(key, value.shape)
  in_proj_weight (24, 8)
  in_proj_bias (24,)
  out_proj.weight (8, 8)
  out_proj.bias (8,)
  >>> back = convert.from_torch(state, num_heads=2)
  >>> all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(back)))
  True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from jattn import _params

__all__ = ("from_equinox", "from_torch", "to_equinox", "to_torch")

Array = jax.Array

_SEPARATE = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
_TORCH_KEYS = ("in_proj_weight", *_SEPARATE, "in_proj_bias", "out_proj.weight", "out_proj.bias")


def _numpy(value: Any) -> np.ndarray:
  """A torch tensor, jax or NumPy array as NumPy, bfloat16 included (which torch cannot export)."""
  if hasattr(value, "detach"):  # a torch tensor; duck-typed so torch need not be imported
    tensor = value.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
      return tensor.float().numpy().astype(jnp.bfloat16)
    return tensor.numpy()
  return np.asarray(value)


def _shape_error(
  key: str, expected: tuple[Any, ...], actual: tuple[int, ...], why: str
) -> NoReturn:
  raise ValueError(f"state dict entry {key!r} must have shape {expected} ({why}); got {actual}.")


def from_torch(module_or_state_dict: Any, num_heads: int | None = None) -> dict[str, dict]:
  """Converts ``torch.nn.MultiheadAttention`` weights to a jattn parameter pytree.

  With ``E = embed_dim`` and ``H = E // num_heads``, torch's packed
  ``in_proj_weight (3E, E)`` (or, when ``kdim``/``vdim`` differ from ``E``,
  ``q_proj_weight (E, E)``, ``k_proj_weight (E, kdim)``, ``v_proj_weight (E, vdim)``)
  and ``out_proj.weight (E, E)`` become kernels ``(E, N, H)``, ``(kdim, N, H)``,
  ``(vdim, N, H)`` and ``(N, H, E)``; ``in_proj_bias (3E,)`` and ``out_proj.bias
  (E,)`` become biases ``(N, H)`` and ``(E,)``. Then
  ``jattn.attention(params, query, key_value)`` equals
  ``module(query, key_value, key_value, need_weights=False)[0]`` (with
  ``batch_first=True``; in eval mode or with ``dropout=0``).

  Args:
    module_or_state_dict: a ``torch.nn.MultiheadAttention``, or its state dict: a
      mapping from torch's key names to tensors or arrays (torch itself is then
      not needed).
    num_heads: ``N``; read from the module, required with a state dict (whose
      shapes do not tell it).

  Returns:
    ``{"query", "key", "value", "out"}``, each ``{"kernel", "bias"}`` (no
    ``"bias"`` where torch has none), as jax arrays of the tensors' dtype.

  Raises:
    ValueError: for ``add_bias_kv=True`` (``bias_k``/``bias_v``) or
      ``add_zero_attn=True``, ``kdim != vdim`` (jattn's keys and values share one
      input), a missing ``num_heads``, and for missing, unexpected or
      wrongly shaped entries, naming the key and the shapes.
    TypeError: for anything but a module or a mapping.

  Examples:
    >>> import jattn, numpy as np, torch
    >>> m = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    >>> p = from_torch(m)
    >>> p["query"]["kernel"].shape, p["out"]["kernel"].shape
    ((16, 4, 4), (4, 4, 16))
    >>> x = torch.randn(2, 5, 16)  # (batch, seq, features)
    >>> expected = m(x, x, x, need_weights=False)[0].detach().numpy()
    >>> np.allclose(jattn.attention(p, x.numpy(), x.numpy()), expected, atol=1e-5)
    True
  """
  if isinstance(module_or_state_dict, Mapping):
    state = dict(module_or_state_dict)
    if num_heads is None:
      raise ValueError("num_heads is required with a state dict: its shapes do not tell it.")
  else:
    import torch

    module = module_or_state_dict
    if not isinstance(module, torch.nn.MultiheadAttention):
      raise TypeError(
        "from_torch expects a torch.nn.MultiheadAttention or its state dict, got "
        f"{type(module).__name__}."
      )
    if num_heads is not None and num_heads != module.num_heads:
      raise ValueError(f"num_heads={num_heads} but the module has {module.num_heads} heads.")
    if module.add_zero_attn:
      raise ValueError(
        "add_zero_attn=True appends a zero key/value position, which jattn does not model."
      )
    num_heads = module.num_heads
    state = module.state_dict()
  _params._positive("num_heads", num_heads)

  if "bias_k" in state or "bias_v" in state:
    raise ValueError(
      "add_bias_kv=True is not supported: bias_k/bias_v append a learned key/value "
      "position, which jattn's pytree does not model."
    )
  unexpected = sorted(set(state) - set(_TORCH_KEYS))
  if unexpected:
    raise ValueError(
      f"unexpected state dict entries {unexpected}; expected torch.nn.MultiheadAttention's "
      f"{list(_TORCH_KEYS)} (strip any prefix of an enclosing module)."
    )
  if "out_proj.weight" not in state:
    raise ValueError(f"the state dict has no 'out_proj.weight'; it has {sorted(state)}.")
  arrays = {k: _numpy(v) for k, v in state.items()}

  w_o = arrays["out_proj.weight"]
  if w_o.ndim != 2 or w_o.shape[0] != w_o.shape[1]:
    _shape_error("out_proj.weight", ("E", "E"), w_o.shape, "square, E = embed_dim")
  E = w_o.shape[0]
  if E % num_heads:
    raise ValueError(f"embed_dim {E} (from out_proj.weight) is not divisible by {num_heads} heads.")
  H = E // num_heads

  packed = "in_proj_weight" in arrays
  separate = [k for k in _SEPARATE if k in arrays]
  if packed and separate:
    raise ValueError(f"the state dict has both 'in_proj_weight' and {separate}; give one layout.")
  if packed:
    w = arrays["in_proj_weight"]
    if w.shape != (3 * E, E):
      _shape_error("in_proj_weight", (3 * E, E), w.shape, f"(3 * embed_dim, embed_dim), E = {E}")
    w_q, w_k, w_v = w[:E], w[E : 2 * E], w[2 * E :]
  else:
    missing = [k for k in _SEPARATE if k not in arrays]
    if missing:
      raise ValueError(
        f"the state dict has neither 'in_proj_weight' nor all of {list(_SEPARATE)} "
        f"(missing {missing}); it has {sorted(state)}."
      )
    w_q, w_k, w_v = (arrays[k] for k in _SEPARATE)
    if w_q.shape != (E, E):
      _shape_error("q_proj_weight", (E, E), w_q.shape, f"(embed_dim, embed_dim), E = {E}")
    for key, w_in in (("k_proj_weight", w_k), ("v_proj_weight", w_v)):
      if w_in.ndim != 2 or w_in.shape[0] != E:
        _shape_error(key, (E, "kdim"), w_in.shape, f"(embed_dim, input features), E = {E}")
    if w_k.shape != w_v.shape:
      raise ValueError(
        f"k_proj_weight {w_k.shape} and v_proj_weight {w_v.shape} must have the same input "
        "features (kdim == vdim): jattn projects keys and values from one input x_kv."
      )

  biases: list[np.ndarray | None] = [None, None, None]
  if "in_proj_bias" in arrays:
    b = arrays["in_proj_bias"]
    if b.shape != (3 * E,):
      _shape_error("in_proj_bias", (3 * E,), b.shape, f"3 * embed_dim, E = {E}")
    biases = [b[:E], b[E : 2 * E], b[2 * E :]]
  b_o = arrays.get("out_proj.bias")
  if b_o is not None and b_o.shape != (E,):
    _shape_error("out_proj.bias", (E,), b_o.shape, f"embed_dim, E = {E}")

  params: dict[str, dict[str, Array]] = {}
  for name, w_in, b_in in zip(("query", "key", "value"), (w_q, w_k, w_v), biases, strict=True):
    params[name] = {"kernel": jnp.asarray(w_in.T.reshape(w_in.shape[1], num_heads, H))}
    if b_in is not None:
      params[name]["bias"] = jnp.asarray(b_in.reshape(num_heads, H))
  params["out"] = {"kernel": jnp.asarray(w_o.T.reshape(num_heads, H, E))}
  if b_o is not None:
    params["out"]["bias"] = jnp.asarray(b_o)
  return params


def _shapes(proj: _params.Projections) -> str:
  out = "" if proj.out is None else f", out {proj.out[0].shape}"
  return (
    f"query kernel {proj.query[0].shape}, key kernel {proj.key[0].shape}, "
    f"value kernel {proj.value[0].shape}{out}"
  )


def _check_plain(proj: _params.Projections, target: str) -> None:
  """What ``target`` has no place for is an error, never dropped in the conversion."""
  extras = [name for name in ("sinks", "query_ln", "key_ln") if getattr(proj, name) is not None]
  if extras:
    raise ValueError(f"{target} has no place for the pytree's {extras} ({_shapes(proj)}).")
  if proj.key[0].shape[0] != proj.value[0].shape[0]:
    raise ValueError(
      f"{target} here takes keys and values from one input: the key and value kernels must "
      f"have the same input features ({_shapes(proj)})."
    )


def _torch_array(x: Array) -> np.ndarray:
  return np.array(x, order="C")  # a writable copy: torch.from_numpy warns on read-only arrays


def to_torch(params: Any, module: Any = None) -> Any:
  """Exports a jattn pytree as a ``torch.nn.MultiheadAttention`` state dict, or loads it.

  torch's attention has ``N`` heads of size ``H`` for query, key and value alike
  and an ``(E, E)`` output projection, ``E = N * H``. So the pytree must have
  query kernel ``(E, N, H)``, key and value kernels ``(Fkv, N, H)`` (no grouped
  heads, ``D == H``), an out kernel ``(N, H, E)``, and biases on all four
  projections or on none. The state dict is that of
  ``torch.nn.MultiheadAttention(E, N, bias=..., kdim=Fkv, vdim=Fkv)``: a packed
  ``in_proj_weight (3E, E)`` when ``Fkv == E``, else ``q_proj_weight (E, E)``,
  ``k_proj_weight (E, Fkv)`` and ``v_proj_weight (E, Fkv)``.

  Args:
    params: a pytree from :func:`jattn.init` (2-D kernels count as one head).
    module: optional ``torch.nn.MultiheadAttention`` to load the weights into,
      in place; its ``num_heads``, ``embed_dim``, ``kdim``/``vdim`` and ``bias``
      must match the pytree.

  Returns:
    Without ``module``, the state dict: a dict from torch's key names to NumPy
    arrays of the pytree's dtypes (``torch.from_numpy`` turns them into
    tensors). With ``module``, the module itself, with the weights loaded.

  Raises:
    ValueError: for a pytree torch cannot represent (grouped heads, ``D != H``,
      no ``"out"``, output or query features other than ``N * H``, biases on
      some projections only) or a module whose configuration differs, naming the
      shapes.

  Examples:
    >>> import jax, jattn
    >>> p = jattn.init(jax.random.key(0), 8, 4, num_heads=2, kv_features=6, out_features=8)
    >>> sorted(to_torch(p))  # kv_features != 8: the separate layout, no biases
    ['k_proj_weight', 'out_proj.weight', 'q_proj_weight', 'v_proj_weight']
    >>> import numpy as np, torch
    >>> m = torch.nn.MultiheadAttention(8, 2, kdim=6, vdim=6, bias=False, batch_first=True)
    >>> m = to_torch(p, m)  # loaded in place, and returned
    >>> q, kv = torch.randn(2, 3, 8), torch.randn(2, 4, 6)
    >>> out = m(q, kv, kv, need_weights=False)[0]
    >>> out.shape
    torch.Size([2, 3, 8])
    >>> np.allclose(out.detach().numpy(), jattn.attention(p, q.numpy(), kv.numpy()), atol=1e-5)
    True
  """
  proj = _params.Projections(params)
  _check_plain(proj, "torch.nn.MultiheadAttention")
  (w_q, b_q), (w_k, b_k), (w_v, b_v) = proj.query, proj.key, proj.value
  N, H = proj.num_heads, proj.head_dim
  E = N * H
  if w_k.shape[1] != N:
    raise ValueError(
      f"torch.nn.MultiheadAttention has one key/value head per query head; the pytree has "
      f"{N} query heads and {w_k.shape[1]} key/value heads ({_shapes(proj)})."
    )
  if proj.v_head_dim != H:
    raise ValueError(
      f"torch.nn.MultiheadAttention needs the value head size D ({proj.v_head_dim}) to equal "
      f"the query/key head size H ({H}): {_shapes(proj)}."
    )
  if proj.out is None:
    raise ValueError(
      "torch.nn.MultiheadAttention always has an output projection out_proj (E, E); the "
      f"pytree has no 'out' entry ({_shapes(proj)})."
    )
  w_o, b_o = proj.out
  if w_q.shape[0] != E or w_o.shape[2] != E:
    raise ValueError(
      f"torch.nn.MultiheadAttention needs query input features F and output features O equal "
      f"to N * H = {N} * {H} = {E} (its embed_dim); got F = {w_q.shape[0]}, "
      f"O = {w_o.shape[2]} ({_shapes(proj)})."
    )
  has_bias = [b is not None for b in (b_q, b_k, b_v, b_o)]
  if any(has_bias) and not all(has_bias):
    present = dict(zip(("query", "key", "value", "out"), has_bias, strict=True))
    raise ValueError(
      "torch.nn.MultiheadAttention has biases on all projections or on none (bias=...); "
      f"the pytree has biases {present}. Add zero biases where they are missing."
    )

  # (F, N, H) -> (F, N * H) -> (N * H, F): rows head-major, as torch's.
  w_in = [np.asarray(w).reshape(w.shape[0], E).T for w in (w_q, w_k, w_v)]
  state: dict[str, np.ndarray] = {}
  if w_k.shape[0] == E:
    state["in_proj_weight"] = _torch_array(np.concatenate(w_in, axis=0))
  else:
    for key, w in zip(_SEPARATE, w_in, strict=True):
      state[key] = _torch_array(w)
  if all(has_bias):
    state["in_proj_bias"] = _torch_array(np.concatenate([np.ravel(b) for b in (b_q, b_k, b_v)]))
  state["out_proj.weight"] = _torch_array(np.asarray(w_o).reshape(E, E).T)
  if all(has_bias):
    state["out_proj.bias"] = _torch_array(b_o)
  if module is None:
    return state

  import torch

  if not isinstance(module, torch.nn.MultiheadAttention):
    raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}.")
  if module.num_heads != N:
    raise ValueError(f"the module has {module.num_heads} heads but the pytree has {N}.")
  if module.add_zero_attn:
    raise ValueError(
      "the module has add_zero_attn=True, which appends a zero key/value position that the "
      "pytree does not model."
    )
  expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
  actual = {k: v.shape for k, v in state.items()}
  if expected != actual:
    raise ValueError(
      f"the module's state dict {expected} does not match the pytree's {actual}; create it as "
      f"torch.nn.MultiheadAttention({E}, {N}, bias={all(has_bias)}, kdim={w_k.shape[0]}, "
      f"vdim={w_k.shape[0]})."
    )

  def tensor(a: np.ndarray) -> Any:
    if a.dtype == jnp.bfloat16:  # torch.from_numpy does not know NumPy's bfloat16
      return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(a)

  module.load_state_dict({k: tensor(v) for k, v in state.items()})
  return module


def _linears(mha: Any) -> dict[str, Any]:
  return {
    "query": mha.query_proj,
    "key": mha.key_proj,
    "value": mha.value_proj,
    "out": mha.output_proj,
  }


def _linear(linear: Any) -> tuple[np.ndarray, np.ndarray | None]:
  return np.asarray(linear.weight), None if linear.bias is None else np.asarray(linear.bias)


def from_equinox(mha: Any) -> dict[str, dict]:
  """Converts an ``equinox.nn.MultiheadAttention`` to a jattn parameter pytree.

  The projections ``query_proj``/``key_proj``/``value_proj``/``output_proj``
  (``eqx.nn.Linear``, weight ``(out, in)``) become kernels ``(query_size, N,
  qk_size)``, ``(key_size, N, qk_size)``, ``(value_size, N, vo_size)`` and ``(N,
  vo_size, output_size)``, with biases where the module has them. Then
  ``jattn.attention(params, query, key_value)`` equals
  ``mha(query, key_value, key_value)`` (equinox takes unbatched ``(T, F)``
  inputs; jattn takes any leading batch dimensions). Dropout is not carried
  over: jattn computes the inference output.

  Args:
    mha: an ``equinox.nn.MultiheadAttention``.

  Returns:
    ``{"query", "key", "value", "out"}``, each ``{"kernel"}`` and, where the
    module has one, ``"bias"``.

  Raises:
    ValueError: if ``key_size != value_size`` (jattn's keys and values share one
      input) or the weights do not have the module's shapes.
    TypeError: for anything but an ``equinox.nn.MultiheadAttention``.

  Examples:
    >>> import equinox as eqx, jax, jattn, numpy as np
    >>> m = eqx.nn.MultiheadAttention(4, 16, qk_size=8, vo_size=6, key=jax.random.key(0))
    >>> p = from_equinox(m)
    >>> jax.tree.map(lambda a: a.shape, p)["value"]
    {'kernel': (16, 4, 6)}
    >>> x = jax.random.normal(jax.random.key(1), (5, 16))  # equinox takes (T, F), unbatched
    >>> np.allclose(jattn.attention(p, x, x), m(x, x, x), atol=1e-5)
    True
  """
  import equinox as eqx

  if not isinstance(mha, eqx.nn.MultiheadAttention):
    raise TypeError(f"mha must be an equinox.nn.MultiheadAttention, got {type(mha).__name__}.")
  if mha.key_size != mha.value_size:
    raise ValueError(
      f"key_size ({mha.key_size}) must equal value_size ({mha.value_size}): jattn projects "
      "keys and values from one input x_kv."
    )
  N, qk, vo = mha.num_heads, mha.qk_size, mha.vo_size
  layout = {
    "query": (mha.query_proj, (N * qk, mha.query_size)),
    "key": (mha.key_proj, (N * qk, mha.key_size)),
    "value": (mha.value_proj, (N * vo, mha.value_size)),
    "out": (mha.output_proj, (mha.output_size, N * vo)),
  }
  params: dict[str, dict[str, Array]] = {}
  for name, (linear, shape) in layout.items():
    w, b = _linear(linear)
    if w.shape != shape or (b is not None and b.shape != shape[:1]):
      raise ValueError(
        f"the module's {name} projection must have weight {shape} and bias {shape[:1]}; "
        f"got weight {w.shape}, bias {None if b is None else b.shape}."
      )
    if name == "out":
      params[name] = {"kernel": jnp.asarray(w.T.reshape(N, vo, shape[0]))}
    else:
      params[name] = {"kernel": jnp.asarray(w.T.reshape(shape[1], N, shape[0] // N))}
    if b is not None:
      params[name]["bias"] = jnp.asarray(b if name == "out" else b.reshape(N, shape[0] // N))
  return params


def to_equinox(params: Any, mha: Any) -> Any:
  """Returns ``mha``, an ``equinox.nn.MultiheadAttention``, with the pytree's weights.

  The inverse of :func:`from_equinox`: the module's configuration must match the
  pytree, ``num_heads == N``, ``query_size == F``, ``key_size == value_size ==
  Fkv``, ``qk_size == H``, ``vo_size == D``, ``output_size == O``, and a bias
  wherever ``use_*_bias`` is set and nowhere else. The weights keep the
  pytree's dtype. ``mha`` itself is not changed (``equinox.tree_at``).

  Args:
    params: a pytree from :func:`jattn.init` with an ``"out"`` projection and
      no grouped heads (2-D kernels count as one head).
    mha: an ``equinox.nn.MultiheadAttention`` of the matching configuration.

  Returns:
    A new ``equinox.nn.MultiheadAttention``.

  Raises:
    ValueError: for grouped heads, no ``"out"``, or a module whose sizes or
      biases differ, naming the shapes.
    TypeError: for anything but an ``equinox.nn.MultiheadAttention``.

  Examples:
    >>> import equinox as eqx, jax, jattn, numpy as np
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> p = jattn.init(k1, 16, 8, num_heads=4, v_head_dim=6, out_features=16)
    >>> m = to_equinox(p, eqx.nn.MultiheadAttention(4, 16, qk_size=8, vo_size=6, key=k2))
    >>> x = jax.random.normal(k3, (5, 16))
    >>> np.allclose(m(x, x, x), jattn.attention(p, x, x), atol=1e-5)
    True
  """
  import equinox as eqx

  if not isinstance(mha, eqx.nn.MultiheadAttention):
    raise TypeError(f"mha must be an equinox.nn.MultiheadAttention, got {type(mha).__name__}.")
  proj = _params.Projections(params)
  _check_plain(proj, "equinox.nn.MultiheadAttention")
  N = proj.num_heads
  if proj.key[0].shape[1] != N:
    raise ValueError(
      f"equinox.nn.MultiheadAttention has one key/value head per query head; the pytree has "
      f"{N} query heads and {proj.key[0].shape[1]} key/value heads ({_shapes(proj)})."
    )
  if proj.out is None:
    raise ValueError(
      "equinox.nn.MultiheadAttention always has an output projection; the pytree has no "
      f"'out' entry ({_shapes(proj)})."
    )
  if mha.num_heads != N:  # the total sizes may agree, split into different heads
    raise ValueError(f"the module has {mha.num_heads} heads but the pytree has {N}.")
  entries = {"query": proj.query, "key": proj.key, "value": proj.value, "out": proj.out}
  linears = _linears(mha)
  weights, where = [], []
  for name, (kernel, bias) in entries.items():
    linear = linears[name]
    if name == "out":  # (N, D, O) -> (O, N * D)
      w = kernel.reshape(-1, kernel.shape[2]).T
    else:  # (F, N, H) -> (N * H, F)
      w = kernel.reshape(kernel.shape[0], -1).T
    b = None if bias is None else bias.reshape(-1)
    w_eqx, b_eqx = _linear(linear)
    if w.shape != w_eqx.shape or (b is None) != (b_eqx is None):
      raise ValueError(
        f"params[{name!r}] (kernel {kernel.shape}, bias {None if bias is None else bias.shape}) "
        f"does not fit the module's {name} projection (weight {w_eqx.shape}, bias "
        f"{None if b_eqx is None else b_eqx.shape})."
      )
    weights.append(w)
    where.append(lambda m, name=name: _linears(m)[name].weight)
    if b is not None:
      weights.append(b)
      where.append(lambda m, name=name: _linears(m)[name].bias)
  return eqx.tree_at(lambda m: [f(m) for f in where], mha, weights)
