"""A JAX function of uint8 images -> an ONNX graph, through jax2onnx (the optional extra).

`pip install 'bmcc[export]'` installs onnx, onnxruntime and jax2onnx 0.13. Why 0.13: releases
0.14 to 0.17.1 require orbax-checkpoint < 0.11.37 and bmcc pins 0.12.8, so 0.13.0 is what pip
resolves with bmcc's pins; it converts every lax operation our models use (convolutions, pooling,
batch norm, attention, GELU, softmax), and the export tests compare its graphs with JAX.

jax2onnx converts Flax NNX modules by replacing some NNX functions with its own while it traces:
`nnx.max_pool` with one whose `window_shape` is keyword-only and `nnx.Dropout.__call__` with one
without `rngs=`, so bmcc's models (`nnx.max_pool(x, (2, 2), strides=...)`, `self.dropout(x,
rngs=rngs)`) fail under them. `convert` puts the originals back for the duration of the
function's trace: pooling then reaches jax2onnx as `reduce_window_max` (lowered to MaxPool), and
dropout in eval mode is the identity; its other replacements (Conv, Linear, BatchNorm, ...) are
kept.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax._src import core as jax_core  # is_symbolic_dim: not public

from bmcc.config_validation import ConfigError

INSTALL_HINT = "pip install 'bmcc[export]'"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
# The lowest opset jax2onnx 0.13 works at (ReduceMax with its axes as an input); ONNX Runtime
# reads it from 1.16 on.
OPSET = 18

# NNX's own functions, captured at import (before any conversion has replaced them).
_ORIGINALS = {"max_pool": nnx.max_pool, "dropout_call": nnx.Dropout.__call__}


def check_available() -> None:
  """Raises ConfigError naming the extra to install when onnx or jax2onnx is missing."""
  for module in ("onnx", "jax2onnx"):
    try:
      __import__(module)
    except ImportError:
      raise ConfigError(f"--format=onnx needs {module}, which is not installed: "
                        f"{INSTALL_HINT} (or --format=stablehlo).") from None


@contextlib.contextmanager
def _nnx_originals() -> Iterator[None]:
  """NNX's own max_pool and Dropout.__call__ in place of jax2onnx's (see the module docstring)."""
  saved = nnx.max_pool, nnx.Dropout.__call__
  nnx.max_pool, nnx.Dropout.__call__ = _ORIGINALS["max_pool"], _ORIGINALS["dropout_call"]
  try:
    yield
  finally:
    nnx.max_pool, nnx.Dropout.__call__ = saved


def _quiet_jax2onnx() -> None:
  # jax2onnx imports all of its plugins on first use and logs a traceback for the few that do not
  # import with this jax (e.g. dm_pix's space_to_depth); none of them is one our models need.
  for name in ("jax2onnx", "onnx_ir"):  # onnx_ir: warnings about untyped constant shapes
    logging.getLogger(name).setLevel(logging.ERROR)


def convert(fn: Callable[[jax.Array], jax.Array], spec: jax.ShapeDtypeStruct, name: str = "bmcc"):
  """`fn` as an onnx.ModelProto with a dynamic first dimension, input `images`, output
  `probabilities`.

  `spec` gives the input's shape and dtype (its first dimension is replaced by the symbol N).
  Raises ConfigError (one line) when jax2onnx cannot convert an operation, naming it.
  """
  check_available()
  import jax2onnx

  _quiet_jax2onnx()

  # The function is traced here, before jax2onnx patches anything, into plain lax operations with
  # a symbolic batch N; jax2onnx then traces the evaluation of that jaxpr, with its own symbol
  # for N substituted into the operations' shape parameters: its NNX patches are never called.
  (batch,) = jax.export.symbolic_shape("N")
  closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((batch, *spec.shape[1:]), spec.dtype))

  missing = _unsupported(closed.jaxpr)
  if missing:
    raise ConfigError(f"ONNX export: jax2onnx {_version()} has no conversion for the operation"
                      f"{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                      "--format=stablehlo exports this model.")

  def traced(images: jax.Array) -> jax.Array:
    return _eval_inlined(closed.jaxpr, closed.consts, [images], {batch: images.shape[0]})[0]

  shape = ("N", *spec.shape[1:])
  try:
    model = jax2onnx.to_onnx(traced, [jax.ShapeDtypeStruct(shape, spec.dtype)], model_name=name,
                             opset=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
  except Exception as e:  # jax2onnx raises NotImplementedError, or any error of a plugin
    message = " ".join(str(e).split())
    primitive = re.search(r"primitive '([\w.-]+)'", message)
    if primitive:
      raise ConfigError(f"ONNX export: the operation {primitive.group(1)!r} has no ONNX "
                        f"conversion in jax2onnx {_version()}; --format=stablehlo exports this "
                        "model.") from None
    raise ConfigError(f"ONNX export failed in jax2onnx {_version()} ({type(e).__name__}: "
                      f"{message[:300]}); --format=stablehlo exports this model.") from None
  # jax2onnx records some intermediate shapes in NHWC where its NCHW nodes make them NCHW;
  # ONNX Runtime warns and ignores them. Shape inference at load time recomputes all of them.
  del model.graph.value_info[:]
  return model


# Call-like primitives whose body is evaluated in place: jax2onnx 0.13 fails on nested jaxprs
# with jax 0.12 (it looks for `jax._src.core.ClosedJaxpr`, which jax 0.12 moved).
_INLINED = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
            "custom_vjp_call_jaxpr", "remat", "checkpoint"}


def _primitives(jaxpr) -> set[str]:
  """The names of the primitives `_eval_inlined` binds for `jaxpr` (call bodies inlined)."""
  names = set()
  for eqn in jaxpr.eqns:
    body = next((eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr")
                 if k in eqn.params), None)
    if eqn.primitive.name in _INLINED and body is not None:
      names |= _primitives(getattr(body, "jaxpr", body))
    elif not (eqn.primitive.name == "reduce_window_max" and _is_2d_pool(eqn.params)):
      names.add(eqn.primitive.name)
  return names


def _unsupported(jaxpr) -> list[str]:
  """The primitives of `jaxpr` for which jax2onnx has no plugin (sorted)."""
  try:
    from jax2onnx.plugins import plugin_system
  except ImportError:  # a jax2onnx without this module: its own error will say it
    return []
  plugin_system.import_all_plugins()
  return sorted(_primitives(jaxpr) - set(plugin_system.PLUGIN_REGISTRY))


def _is_2d_pool(params: dict) -> bool:
  """A max pool over the middle two axes of NHWC, without dilation."""
  window, strides = params["window_dimensions"], params["window_strides"]
  return (len(window) == 4 and window[0] == window[3] == 1 and strides[0] == strides[3] == 1
          and params["padding"][0] == params["padding"][3] == (0, 0)
          and set(params["base_dilation"]) == set(params["window_dilation"]) == {1})


def _max_pool(x: jax.Array, params: dict) -> jax.Array:
  """`reduce_window_max` as jax2onnx's own `nnx.max_pool` (active while it traces), which it
  lowers to one MaxPool; its lowering of the lax primitive makes a 4-D pool ONNX Runtime lacks.
  The padding goes first, as -inf (the pool's identity): that plugin ignores explicit padding."""
  window, strides, padding = (params[k] for k in ("window_dimensions", "window_strides",
                                                   "padding"))
  for axis in (1, 2):  # by concatenation: jax2onnx 0.13's Pad fails on a symbolic batch
    lo, hi = padding[axis]
    if lo or hi:
      parts = [jnp.broadcast_to(jnp.array(-jnp.inf, x.dtype),
                                (*x.shape[:axis], n, *x.shape[axis + 1:])) for n in (lo, hi)]
      x = jnp.concatenate([parts[0], x, parts[1]], axis=axis)
  return nnx.max_pool(x, window_shape=tuple(window[1:3]), strides=tuple(strides[1:3]),
                      padding="VALID")


def _substitute(value, dims: dict):
  """`value` (a parameter: nested tuples and lists of anything) with the symbolic dimensions of
  `dims` replaced by their values."""
  if type(value) in (tuple, list):  # not named tuples (dimension numbers): no shapes in them
    return type(value)(_substitute(v, dims) for v in value)
  if jax_core.is_symbolic_dim(value):
    for old, new in dims.items():
      if value is old or str(value) == str(old):
        return new
    raise ConfigError(f"ONNX export: the shape expression {value} of the batch size is not "
                      "supported; --format=stablehlo exports this model.")
  return value


def _eval_inlined(jaxpr, consts, args, dims: dict) -> list:
  """`jax.core.eval_jaxpr` with the bodies of call-like primitives evaluated inline (on
  tracers: the result is one flat sequence of primitives) and the symbolic dimensions of `dims`
  replaced in the shape parameters."""
  env = {}

  def read(var):
    return var.val if hasattr(var, "val") else env[var]

  for var, value in zip(jaxpr.constvars, consts, strict=True):
    env[var] = value
  for var, value in zip(jaxpr.invars, args, strict=True):
    env[var] = value
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    body = next((eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr")
                 if k in eqn.params), None)
    if eqn.primitive.name == "reduce_window_max" and _is_2d_pool(eqn.params):
      outvals = [_max_pool(invals[0], eqn.params)]
    elif eqn.primitive.name in _INLINED and body is not None:
      if hasattr(body, "consts"):  # a closed jaxpr
        outvals = _eval_inlined(body.jaxpr, body.consts, invals, dims)
      else:
        outvals = _eval_inlined(body, [], invals, dims)
    else:
      params = {k: _substitute(v, dims) for k, v in eqn.params.items()}
      outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
      if not eqn.primitive.multiple_results:
        outvals = [outvals]
    for var, value in zip(eqn.outvars, outvals, strict=True):
      env[var] = value
  return [read(v) for v in jaxpr.outvars]


def _version() -> str:
  from importlib import metadata

  try:
    return metadata.version("jax2onnx")
  except metadata.PackageNotFoundError:
    return "?"


def set_metadata(model, entries: dict[str, str]) -> None:
  """Adds string `entries` to the model's metadata_props (replacing keys already there)."""
  kept = [p for p in model.metadata_props if p.key not in entries]
  del model.metadata_props[:]
  for prop in kept:
    model.metadata_props.add(key=prop.key, value=prop.value)
  for key, value in entries.items():
    model.metadata_props.add(key=key, value=value)
