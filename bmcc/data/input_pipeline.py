"""The one data entry point of training and evaluation: config + prepared dataset + mesh -> batches.

`create_train_iter` and `create_eval_iter` own everything between the prepared TFDS dataset and the
step: which records a role reads (split or fold, the run's classes), the class mapping, the
record-index cache, augmentation, class-balanced sampling, class weights and the per-process batch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator

import grain
import jax
import ml_collections
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bmcc.data import augment, pipeline, sampling, splits


@dataclasses.dataclass(frozen=True)
class TrainData:
  """What the training loop needs from the data."""

  iterator: grain.DatasetIterator  # batches {image, label} as global jax.Arrays; checkpointable
  mapping: pipeline.ClassMapping
  num_examples: int  # training examples of the run, all processes together
  steps_per_epoch: int  # num_examples // batch_size (at least 1)
  class_weights: jax.Array | None  # [C] loss weights, replicated; None: unweighted


@dataclasses.dataclass(frozen=True)
class EvalData:
  """One pass over an evaluation split: padded numpy batches of this process, and their count."""

  batches: Iterator[dict]  # {image, label, file_name, mask}: this process's part of each batch
  mapping: pipeline.ClassMapping
  num_examples: int  # examples of the split, all processes together


def per_process_batch_size(global_batch_size: int) -> int:
  """This process's share of a global batch (the config's batch sizes are global)."""
  if global_batch_size % jax.process_count():
    raise ValueError(f"Batch size {global_batch_size} is not a multiple of the process count "
                     f"({jax.process_count()}).")
  return global_batch_size // jax.process_count()


def selection(config: ml_collections.ConfigDict, role: str) -> splits.Selection:
  """Which files a role ('train', 'validation', 'test') reads under the config's protocol."""
  return splits.Selection(role, config.data.fold, config.data.num_folds, config.data.split)


def protocol_report(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                    num_test_images: int) -> dict:
  """What a test report records about the protocol (`splits.Selection.describe`), with the number
  of test images evaluated; for 'dinobloom', the listed files absent from the prepared dataset."""
  chosen = selection(config, "test")
  file_names = None
  if chosen.protocol == "dinobloom":
    _, file_names = sampling.read_record_index(_role_source(builder, chosen),
                                               _index_cache(builder, chosen))
  described = chosen.describe(file_names)
  if described.get("dinobloom_missing"):
    logging.warning("%d of DinoBloom's %d test files are not in the prepared dataset (missing from "
                    "the download, or excluded as known bad), e.g. %s.",
                    described["dinobloom_missing"], described["dinobloom_listed"],
                    ", ".join(described["dinobloom_missing_files"][:5]))
  return {**described, "num_test_images": num_test_images}


def data_source(builder: tfds.core.DatasetBuilder, split: str):
  """Random-access records of one prepared split, with the image left as JPEG bytes."""
  return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


def _role_source(builder: tfds.core.DatasetBuilder, chosen: splits.Selection):
  """The random-access records a role reads: its prepared split, or several concatenated."""
  sources = [grain.MapDataset.source(data_source(builder, split)) for split in chosen.splits()]
  return sources[0] if len(sources) == 1 else grain.MapDataset.concatenate(sources)


def _index_cache(builder: tfds.core.DatasetBuilder, chosen: splits.Selection) -> str:
  return os.path.join(builder.data_dir, f"record_index-{'+'.join(chosen.splits())}.npz")


def _select(config, builder, role: str, mapping: pipeline.ClassMapping, *, force: bool = False):
  """(source, records or None, number of examples) of a role; None: every record, unread."""
  chosen = selection(config, role)
  source = _role_source(builder, chosen)
  if not force and mapping.is_identity and not chosen.filters:
    return source, None, len(source)
  records = pipeline.select_records(source, mapping, chosen.keep if chosen.filters else None,
                                    _index_cache(builder, chosen))
  return source, records, len(records[0])


def create_train_iter(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                      mesh: Mesh) -> TrainData:
  """The training stream of the config on `mesh` (see `bmcc.data.pipeline.train_dataset`)."""
  mapping = pipeline.ClassMapping.create(config.data.classes)
  balance_alpha = config.data.balance_alpha
  needs_labels = bool(balance_alpha or config.data.loss_weight_alpha)
  source, records, num_examples = _select(config, builder, "train", mapping, force=needs_labels)
  ds = pipeline.train_dataset(
      source, mapping=mapping, image_size=config.image_size,
      batch_size=per_process_batch_size(config.batch_size), seed=config.seed,
      augment=augment.AugmentConfig.from_config(config.data) or False,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_workers=config.data.num_workers, records=records, balance_alpha=balance_alpha)
  class_weights = None
  if config.data.loss_weight_alpha:
    counts = sampling.class_counts(records[1], mapping.num_classes)
    frequencies = (sampling.class_probabilities(counts, balance_alpha) if balance_alpha else None)
    class_weights = jax.device_put(
        sampling.class_weights(counts, config.data.loss_weight_alpha, frequencies),
        NamedSharding(mesh, P()))
  iterator = pipeline.device_iterator(ds, NamedSharding(mesh, P("data")))
  return TrainData(iterator=iterator, mapping=mapping, num_examples=num_examples,
                   steps_per_epoch=max(1, num_examples // config.batch_size),
                   class_weights=class_weights)


def create_eval_iter(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                     split: str, *, batch_size: int | None = None,
                     classes: tuple[str, ...] | None = None,
                     image_size: int | None = None) -> EvalData:
  """One pass over `split` ('validation' or 'test' role, or 'train') in padded batches.

  `batch_size` (global) defaults to `config.eval_batch_size`; `classes` (the run's class codes)
  and `image_size` to the config's (a checkpoint's metadata may give both).
  """
  mapping = pipeline.ClassMapping.create(classes if classes is not None else config.data.classes)
  source, records, num_examples = _select(config, builder, split, mapping)
  batches = pipeline.eval_batches(
      source, mapping=mapping, image_size=image_size or config.image_size,
      batch_size=per_process_batch_size(batch_size or config.eval_batch_size),
      process_index=jax.process_index(), process_count=jax.process_count(),
      indices=None if records is None else records[0])
  return EvalData(batches=batches, mapping=mapping, num_examples=num_examples)

