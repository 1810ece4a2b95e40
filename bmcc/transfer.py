"""Pretrained weights in a training run: `config.pretrained` loaded into the freshly built model.

`bmcc.train.create_train_state` calls `load_pretrained(config, model)` only when a run starts from
scratch; a resumed run takes every weight from its checkpoint and never reads the file again (it
may be gone). What was loaded (`bmcc.models.pretrained.LoadedWeights`, as a dict) is logged and
stored in the run metadata of every checkpoint (`pretrained_weights`).

The input normalisation travels with the model: a run with `pretrained` set normalises with the
ImageNet statistics the weights expect (`bmcc.steps.input_normalization`), and so do evaluation
and prediction of its checkpoints (`bmcc.checkpointing.restore_model`).

Batch-norm statistics are not parameters: while a ResNet backbone is frozen
(`finetune.freeze_steps`), its running means and variances still follow the bone-marrow batches
(train mode), which adapts the normalisation to the new domain before any weight moves.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import ml_collections
from flax import nnx

from bmcc.config_validation import ConfigError
from bmcc.models import pretrained


def load_pretrained(config: ml_collections.ConfigDict, model: nnx.Module
                    ) -> pretrained.LoadedWeights | None:
  """Loads `config.pretrained` into `model`'s backbone (not its head), in place.

  Returns what was loaded, also kept as `model.pretrained` (a static attribute, as
  `pretrained.load_backbone` sets it), or None when `config.pretrained` is unset.

  Raises:
    ConfigError: the file is missing, unreadable, cannot be fetched, or does not fit the model.
  """
  source = config.get("pretrained")
  if not source:
    return None
  mean, std = getattr(model, "input_mean", None), getattr(model, "input_std", None)
  try:
    loaded = pretrained.load_into(model, config.model, source)
  except (pretrained.PretrainedWeightsError, OSError, ImportError, ValueError, TypeError) as e:
    raise ConfigError(f"config.pretrained={source!r}: {e}") from None
  # `load_into` sets the ImageNet statistics; the config's choice (`input_normalization`) wins.
  if mean is not None:
    model.input_mean, model.input_std = mean, std
  logging.info("Loaded %d pretrained tensors into %s from %s (%s; position grid %s).",
               loaded.tensors, config.model, loaded.path, loaded.layout, loaded.position_grid)
  model.pretrained = loaded
  return loaded


def loaded(model: nnx.Module) -> dict | None:
  """What `load_pretrained` loaded into `model`, as a JSON-ready dict (None if nothing)."""
  weights = getattr(model, "pretrained", None)
  return None if weights is None else json.loads(json.dumps(dataclasses.asdict(weights)))
