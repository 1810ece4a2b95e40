"""The jit-compiled steps and what they need: mesh, model, optimizer, schedule, durations.

Kept free of TensorFlow, TFDS, grain and clu so that benchmarks (`bench/train_step.py`) run on a
GPU machine that has only jax, flax, optax and ml_collections.

One code path for one CPU, several GPUs and several hosts: a `jax.sharding.Mesh` over all devices
with one axis `data`; each batch is sharded over it, parameters and optimizer state are replicated,
and XLA inserts the gradient all-reduce (batch-norm statistics are computed over the global batch).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from bmcc import finetune, models
from bmcc import sharding as sharding_lib
from bmcc.data.normalization import (
  MATEK_MEAN_RGB,
  MATEK_STDDEV_RGB,
  MEAN_RGB,
  STDDEV_RGB,
  normalize_images,
)
from bmcc.errors import ConfigError
from bmcc.models.pretrained import IMAGENET


def create_mesh(devices: list | None = None) -> Mesh:
  """A 1-D mesh named `data` over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


@dataclasses.dataclass(frozen=True)
class Durations:
  """A run's durations in optimizer steps (configs may give them in epochs)."""

  total: int
  warmup: int
  eval_every: int
  checkpoint_every: int
  freeze: int = 0  # steps during which a fine-tuned backbone stays frozen (`config.finetune`)


def resolve_durations(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Durations:
  """Step counts from the config: `<name>_steps` when set, else `<name>_epochs` x steps per epoch.

  Names: num_train (num_epochs), warmup, eval_every, checkpoint_every, and `finetune.freeze_steps`
  (`finetune.freeze_epochs`; neither: 0). So a run described in epochs keeps its length in epochs
  whatever the batch size or the dataset.
  """
  def steps(step_key: str, epoch_key: str, minimum: int) -> int:
    if config.get(step_key) is not None:
      return int(config[step_key])
    if config.get(epoch_key) is None:
      raise ConfigError(f"Set config.{step_key} or config.{epoch_key}.")
    return max(minimum, round(config[epoch_key] * steps_per_epoch))

  durations = Durations(
      total=steps("num_train_steps", "num_epochs", 1),
      warmup=steps("warmup_steps", "warmup_epochs", 0),
      eval_every=steps("eval_every_steps", "eval_every_epochs", 1),
      checkpoint_every=steps("checkpoint_every_steps", "checkpoint_every_epochs", 1),
      freeze=_freeze_steps(config, steps_per_epoch))
  if durations.warmup > durations.total:
    raise ConfigError(f"Warm-up ({durations.warmup} steps) is longer than training "
                     f"({durations.total} steps).")
  return durations


def _freeze_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  tune = config.get("finetune") or {}
  if tune.get("freeze_steps") is not None:
    return int(tune["freeze_steps"])
  return max(0, round((tune.get("freeze_epochs") or 0.0) * steps_per_epoch))


def create_learning_rate_fn(config: ml_collections.ConfigDict,
                            durations: Durations) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then cosine, linear, exponential or no decay.

  The decay runs from the end of warm-up to the last step, ending at
  `learning_rate * end_learning_rate_factor`.
  """
  peak = config.learning_rate
  end = peak * config.end_learning_rate_factor
  warmup = optax.linear_schedule(0.0, peak, durations.warmup)
  decay_steps = max(1, durations.total - durations.warmup)
  if config.lr_schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_learning_rate_factor)
  elif config.lr_schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif config.lr_schedule == "exponential":
    decay = optax.exponential_decay(peak, decay_steps, config.end_learning_rate_factor)
  elif config.lr_schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}.")
  return optax.join_schedules([warmup, decay], [durations.warmup])


def uses_finetune_optimizer(config: ml_collections.ConfigDict) -> bool:
  """Whether `config.finetune` asks for `bmcc.finetune`'s optimizer: layer decay below 1, a frozen
  start or a separate head rate."""
  tune = config.get("finetune") or {}
  return bool((tune.get("layer_decay") or 1.0) < 1.0 or tune.get("freeze_steps")
              or tune.get("freeze_epochs") or tune.get("head_learning_rate") is not None)


def create_optimizer(config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule,
                     model: nnx.Module | None = None,
                     freeze_steps: int = 0) -> optax.GradientTransformation:
  """Adam or AdamW on the schedule, after global-norm gradient clipping.

  With `uses_finetune_optimizer(config)` the inner transformation is
  `bmcc.finetune.create_finetune_optimizer` for `model` (a ViT or a ResNet): layer-wise decay
  `finetune.layer_decay`, the backbone frozen for `freeze_steps` (`Durations.freeze`), the head at
  `finetune.head_learning_rate` on the same schedule shape, weight decay as AdamW's (none for
  'adam'). Clipping before it and the plateau multiplier after it are the same either way, and
  so is the weight-decay rule, `bmcc.finetune.decay_mask` (none on biases, norms, LayerScale,
  position embeddings, class and register tokens).
  """
  if uses_finetune_optimizer(config):
    if model is None:
      raise ValueError("config.finetune needs the model to build its optimizer.")
    tune = config.finetune
    head_schedule = None
    if tune.get("head_learning_rate") is not None:
      head_scale = tune.head_learning_rate / config.learning_rate
      head_schedule = lambda step: learning_rate_fn(step) * head_scale  # noqa: E731
    tx = finetune.create_finetune_optimizer(
        model, learning_rate=learning_rate_fn, head_learning_rate=head_schedule,
        layer_decay=tune.get("layer_decay") or 1.0, freeze_steps=freeze_steps,
        weight_decay=config.weight_decay if config.optimizer == "adamw" else 0.0)
  elif config.optimizer == "adam":
    tx = optax.adam(learning_rate_fn)
  elif config.optimizer == "adamw":
    tx = optax.adamw(learning_rate_fn, weight_decay=config.weight_decay,
                     mask=finetune.decay_mask)
  else:
    raise ValueError(f"Unknown optimizer {config.optimizer!r}.")
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  # A multiplier of the updates that reduce-on-plateau lowers (`set_lr_scale`); it lives in the
  # optimizer state, so checkpoints carry it.
  return optax.chain(tx, optax.inject_hyperparams(optax.scale)(step_size=1.0))


def create_train_optimizer(config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule,
                           model: nnx.Module, freeze_steps: int = 0) -> nnx.Optimizer:
  """`nnx.Optimizer` of `create_optimizer`'s transformation over the parameters the config
  trains (`trainable`): all of them, or only the head (no optimizer state for a frozen backbone).
  """
  tx = create_optimizer(config, learning_rate_fn, model, freeze_steps)
  return nnx.Optimizer(model, tx, wrt=trainable_filter(trainable(config)))


def set_lr_scale(optimizer: nnx.Optimizer, scale: float) -> None:
  """Sets the reduce-on-plateau multiplier, keeping the variable's sharding."""
  variable = optimizer.opt_state[-1].hyperparams["step_size"]
  current = variable[...]
  variable[...] = jax.device_put(jnp.asarray(scale, current.dtype), current.sharding)


def input_normalization(config: ml_collections.ConfigDict
                        ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std), 0..255 scale, of the config's model inputs.

  `config.input_normalization`: 'imagenet' (what pretrained weights expect), 'stain' (bmcc's fixed
  stain statistics), 'matek' (the real cells' statistics, `MATEK_MEAN_RGB`) or 'auto' (default):
  ImageNet when `config.pretrained` is set, else stain.
  """
  choice = config.get("input_normalization") or "auto"
  if choice == "auto":
    choice = "imagenet" if config.get("pretrained") else "stain"
  if choice == "imagenet":
    return tuple(IMAGENET.mean), tuple(IMAGENET.std)
  if choice == "stain":
    return tuple(MEAN_RGB), tuple(STDDEV_RGB)
  if choice == "matek":
    return tuple(MATEK_MEAN_RGB), tuple(MATEK_STDDEV_RGB)
  raise ValueError(f"Unknown input_normalization {choice!r}: use auto, imagenet, stain or matek.")


def normalize_input(model: nnx.Module, images: jax.Array) -> jax.Array:
  """uint8 images -> float32 model input, with the model's own `input_mean` / `input_std`
  (the stain statistics for a model without them)."""
  return normalize_images(images, jnp.float32, getattr(model, "input_mean", MEAN_RGB),
                          getattr(model, "input_std", STDDEV_RGB))


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nnx.Module:
  """The config's model, initialised from `config.seed` (compiled as one program: faster than
  running each initialiser eagerly), carrying its input normalisation (`input_normalization`) as
  the static attributes `input_mean` / `input_std`."""
  model_config = config.model_config.to_dict()

  @nnx.jit
  def create():
    return models.create_model(config.model, num_classes=num_classes,
                               rngs=nnx.Rngs(params=config.seed), **model_config)

  model = create()
  model.input_mean, model.input_std = input_normalization(config)
  return model


def create_ema(config: ml_collections.ConfigDict, model: nnx.Module) -> nnx.EMA | None:
  """An exponential moving average of the model's weights if `config.ema_decay` is set.

  It tracks the parameters and the batch-norm statistics (`nnx.EMA`: a copy of them, so the
  model's memory for weights doubles), starting from the model's current values; the train step
  moves it with `update_ema`, whose decay warms up to d (then it averages over about 1 / (1 - d)
  steps). Its view (`ema.apply_to(model)`) is what is evaluated, kept as the best checkpoint and
  used for prediction.
  """
  if not config.get("ema_decay"):
    return None
  return nnx.EMA(model, config.ema_decay, only=(nnx.Param, nnx.BatchStat))


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
  """The weight average's decay after optimizer update `step` (1, 2, ...): min(d, (1 + t) /
  (10 + t)), the warm-up of TensorFlow's `ExponentialMovingAverage(num_updates=t)` (timm's
  `ModelEmaV3` has a similar optional one). Without it, the average of a short run still holds
  the random initialisation (0.99 ** 132 = 26% of it after 132 steps at d = 0.99: a 12-epoch CPU
  run of `configs/cpu_quick.py` validated its average near chance level up to step 198)."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def update_ema(ema: nnx.EMA, model: nnx.Module, step: jax.Array) -> None:
  """`ema <- d_t * ema + (1 - d_t) * weights` for the tracked weights of `model`, with the
  warmed-up decay `d_t = ema_decay_at(ema.decay, step)` (`nnx.EMA.update` with a decay that
  depends on the step, which it does not take)."""
  decay = ema_decay_at(ema.decay, step)

  def blend(average: nnx.Variable, new: nnx.Variable) -> None:
    value = average[...]
    average[...] = (decay * value + (1.0 - decay) * new[...]).astype(value.dtype)

  jax.tree.map(blend, ema.params, nnx.state(model, ema.filter),
               is_leaf=lambda x: isinstance(x, nnx.Variable))


TRAINABLE = ("all", "head")


def trainable(config: ml_collections.ConfigDict) -> str:
  """What the optimizer updates: 'head' when `config.finetune.freeze_backbone` is set (the
  backbone frozen for the whole run, a linear probe by gradient descent), else 'all'."""
  tune = config.get("finetune") or {}
  return "head" if tune.get("freeze_backbone") else "all"


def trainable_filter(which: str) -> nnx.filterlib.Filter:
  """The NNX filter of the parameters that `which` ('all' or 'head') trains: what is
  differentiated and what has optimizer state."""
  if which == "all":
    return nnx.Param
  if which == "head":
    return nnx.All(nnx.Param, nnx.PathContains("head"))
  raise ValueError(f"Unknown trainable {which!r}: use one of {', '.join(TRAINABLE)}.")


def _loss_and_logits(model: nnx.Module, images: jax.Array, labels: jax.Array,
                     dropout_key: jax.Array, class_weights: jax.Array | None,
                     label_smoothing: float) -> tuple[jax.Array, jax.Array]:
  logits = model(normalize_input(model, images), rngs=nnx.Rngs(dropout=dropout_key))
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  losses = optax.softmax_cross_entropy(logits, targets)
  if class_weights is not None:
    losses = losses * class_weights[labels]
  return losses.mean(), logits


def _micro_batches(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B / k, ...] where micro-batch j holds examples j, j + k, j + 2k, ...

  Strided rather than contiguous so that every micro-batch stays split over all devices (each
  device's contiguous shard of the batch holds B / (k x devices) examples of each).
  """
  x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and sharding_lib.AXIS in mesh.axis_names:
    x = jax.lax.with_sharding_constraint(x, P(None, sharding_lib.AXIS))
  return x


def _accumulated(model: nnx.Module, wrt: nnx.filterlib.Filter, images: jax.Array,
                 labels: jax.Array, dropout_key: jax.Array, class_weights: jax.Array | None,
                 label_smoothing: float, k: int, rule: sharding_lib.Rule
                 ) -> tuple[jax.Array, jax.Array, Any]:
  """(mean loss, accuracy, mean gradient) over k micro-batches, one `lax.scan` step each.

  Each micro-batch runs forward and backward alone, so its activations are all that is live;
  batch-norm layers normalise with the micro-batch's statistics and update their running
  statistics once per micro-batch (k momentum updates per optimizer step), as PyTorch gradient
  accumulation does. Dropout draws micro-batch j's masks from `fold_in(dropout_key, j)`. The
  model's non-trained state (batch-norm statistics) is updated in place.
  """
  graphdef, diff, rest = nnx.split(model, wrt, ...)

  def body(carry, xs):
    grad_sum, rest, loss_sum, correct_sum = carry
    images, labels, j = xs

    def loss_of(diff):
      # Fresh Variables for this trace (the carried ones belong to the scan's).
      micro_model = nnx.merge(graphdef, diff, jax.tree.map(lambda x: x, rest))
      loss, logits = _loss_and_logits(micro_model, images, labels,
                                      jax.random.fold_in(dropout_key, j), class_weights,
                                      label_smoothing)
      _, _, new_rest = nnx.split(micro_model, wrt, ...)
      return loss, (jnp.sum(jnp.argmax(logits, -1) == labels), new_rest)

    (loss, (correct, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(diff)
    grad_sum = sharding_lib.constrain(jax.tree.map(jnp.add, grad_sum, grads), rule)
    return (grad_sum, rest, loss_sum + loss, correct_sum + correct), None

  zeros = sharding_lib.constrain(jax.tree.map(jnp.zeros_like, diff), rule)
  init = (zeros, rest, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
  (grad_sum, rest, loss_sum, correct), _ = jax.lax.scan(
      body, init, (_micro_batches(images, k), _micro_batches(labels, k), jnp.arange(k)))
  nnx.update(model, rest)
  grads = jax.tree.map(lambda g: g / k, grad_sum)
  return loss_sum / k, correct / labels.shape[0], grads


@nnx.jit(donate_argnums=(0, 1, 6),
         static_argnames=("label_smoothing", "accumulate_steps", "rule", "trainable"))
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, images: jax.Array,
               labels: jax.Array, dropout_key: jax.Array,
               class_weights: jax.Array | None = None, ema: nnx.EMA | None = None,
               label_smoothing: float = 0.0, accumulate_steps: int = 1,
               rule: sharding_lib.Rule = sharding_lib.REPLICATED, trainable: str = "all"
               ) -> dict[str, jax.Array]:
  """One optimizer step on a (sharded) batch of uint8 images; returns loss, accuracy and norms.

  `class_weights` [C], if given, weights each example's loss by its class (mean 1 over the
  training examples: `bmcc.data.sampling.class_weights`). `ema`, if given (`create_ema`), moves
  towards the updated weights. `accumulate_steps` k > 1 computes the gradient of the batch in k
  micro-batches of B / k (`_accumulated`: one `lax.scan` inside this one program), then makes
  one update. `rule` (`bmcc.sharding.Rule`) keeps gradients, parameters, optimizer state and the
  weight average in their layout (under `jax.set_mesh`). `trainable` 'head' differentiates and
  updates only the head (`trainable_filter`): no gradient flows into the backbone, whose
  backward pass XLA then drops. Nothing here waits for the host: the metrics come back as device
  arrays.
  """
  model.train()
  wrt = trainable_filter(trainable)
  with sharding_lib.fsdp_training(rule) if rule.kind == "fsdp" else nullcontext():
    return _train_step(model, optimizer, images, labels, dropout_key, class_weights, ema,
                       label_smoothing, accumulate_steps, rule, wrt)


def _train_step(model, optimizer, images, labels, dropout_key, class_weights, ema,
                label_smoothing, accumulate_steps, rule, wrt) -> dict[str, jax.Array]:
  if accumulate_steps == 1:
    def loss_fn(model):
      return _loss_and_logits(model, images, labels, dropout_key, class_weights, label_smoothing)

    (loss, logits), grads = nnx.value_and_grad(
        loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
    grads = sharding_lib.constrain(grads, rule)
    accuracy = (jnp.argmax(logits, -1) == labels).mean()
  else:
    loss, accuracy, grads = _accumulated(model, wrt, images, labels, dropout_key, class_weights,
                                         label_smoothing, accumulate_steps, rule)
  optimizer.update(model, grads)
  if ema is not None:
    update_ema(ema, model, optimizer.step[...])
  if rule.kind != "data":
    nnx.update(model, sharding_lib.constrain(nnx.state(model), rule))
    nnx.update(optimizer, sharding_lib.constrain(nnx.state(optimizer), rule))
    if ema is not None:
      nnx.update(ema, sharding_lib.constrain(nnx.state(ema), rule))
  # The updated weights' norm too: a finite loss and gradient can still give non-finite weights,
  # and the loop refuses to checkpoint any non-finite metric.
  return {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads),
          "param_norm": optax.tree.norm(nnx.state(model, nnx.Param))}


@nnx.jit
def eval_step(model: nnx.Module, images: jax.Array) -> jax.Array:
  """Softmax probabilities [N, C] of a batch of uint8 images."""
  model.eval()
  logits = model(normalize_input(model, images))
  return jax.nn.softmax(logits, axis=-1)


@nnx.jit
def dihedral_average(model: nnx.Module, images: jax.Array) -> jax.Array:
  """Softmax probabilities [N, C] of square uint8 images, averaged over their 8 symmetries.

  The 8 views are the rotations by 0, 90, 180 and 270 degrees, each with and without a
  left-right flip (the dihedral group of the square, which the training augmentation samples).
  The probabilities, not the logits, are averaged. Works on sharded batches like `eval_step`.
  """
  model.eval()
  x = normalize_input(model, images)
  total = jnp.zeros((), jnp.float32)
  for k in range(4):
    rotated = jnp.rot90(x, k, axes=(1, 2))
    for view in (rotated, rotated[:, :, ::-1]):
      total = total + jax.nn.softmax(model(view), axis=-1)
  return total / 8.0
