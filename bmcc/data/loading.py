"""Resolves where the dataset lives for a config and makes sure it is prepared.

Real data: the prepared TFDS dataset in `data.data_dir`; if it is missing but a download is in
`data.manual_dir`, it is prepared first (with progress); if neither is there, DatasetNotFoundError
says where to put what. Synthetic data (`data.synthetic` set): written once into `data.cache_dir`
by `bmcc.synthetic`, then prepared by the same builder as the real download. In a run of several
processes they prepare in turn (each skips what an earlier one already made on a shared disk), so
that two never write the same directories at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

import ml_collections
import tensorflow_datasets as tfds

from bmcc.data import bone_marrow, discovery
from bmcc.synthetic import write_demo_dataset

DatasetNotFoundError = discovery.DatasetNotFoundError


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _synthetic_dirs(data_config: ml_collections.ConfigDict) -> tuple[str, str]:
  spec = json.dumps(data_config.synthetic.to_dict(), sort_keys=True)
  digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
  cache = os.path.expanduser(data_config.cache_dir or "~/.cache/bmcc")
  base = os.path.join(cache, f"synthetic-{digest}")
  return os.path.join(base, "download"), os.path.join(base, "tfds")


def _ensure_synthetic_download(manual_dir: str, spec: ml_collections.ConfigDict) -> None:
  if os.path.isdir(manual_dir):
    return
  parent = os.path.dirname(manual_dir)
  os.makedirs(parent, exist_ok=True)
  logging.info("Writing the synthetic dataset into %s ...", manual_dir)
  tmp = tempfile.mkdtemp(prefix=".download-", dir=parent)
  try:
    write_demo_dataset(tmp, scale=spec.scale, minimum=spec.minimum, seed=spec.seed)
    os.replace(tmp, manual_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def dataset_dirs(data_config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(data_dir, manual_dir) for a config's `data` section."""
  if data_config.synthetic is not None:
    manual_dir, data_dir = _synthetic_dirs(data_config)
    return data_dir, manual_dir
  data_dir = os.path.expanduser(data_config.data_dir or default_data_dir())
  manual_dir = data_config.manual_dir or os.path.join(data_dir, "downloads", "manual")
  return data_dir, os.path.expanduser(manual_dir)


_PREPARE_TIMEOUT_MS = 24 * 3600 * 1000  # a real download takes minutes; a dead peer ends the wait


def load_builder(data_config: ml_collections.ConfigDict, *, prepare: bool = True
                 ) -> tfds.core.DatasetBuilder:
  """The prepared `bone_marrow` builder for a config, preparing it first if needed."""
  import jax  # noqa: PLC0415
  from jax._src import distributed  # noqa: PLC0415  (no public handle on the runtime's barrier)

  client = distributed.global_state.client
  if not prepare or jax.process_count() == 1 or client is None:
    return _load_builder(data_config, prepare=prepare)
  builder = None
  for turn in range(jax.process_count()):
    if turn == jax.process_index():
      builder = _load_builder(data_config, prepare=prepare)
    client.wait_at_barrier(f"bmcc/data_prepared/{turn}", _PREPARE_TIMEOUT_MS)
  return builder


def _load_builder(data_config: ml_collections.ConfigDict, *, prepare: bool
                  ) -> tfds.core.DatasetBuilder:
  data_dir, manual_dir = dataset_dirs(data_config)
  builder = bone_marrow.Builder(data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return builder
  if data_config.synthetic is not None:
    _ensure_synthetic_download(manual_dir, data_config.synthetic)
  if not prepare:
    raise DatasetNotFoundError(f"The dataset is not prepared in {data_dir!r}.")
  if not os.path.exists(manual_dir):
    raise DatasetNotFoundError(
        f"The dataset is not prepared in {data_dir!r} and the manual dir {manual_dir!r} does not "
        "exist. Put the download (the Kaggle zip as downloaded, or the extracted "
        "'bone_marrow_cell_dataset/' or 'BM_cytomorphology_data/' folder) there, or point "
        "--config.data.manual_dir at it, or --config.data.data_dir at an already prepared copy.")
  return bone_marrow.prepare(data_dir, manual_dir)
