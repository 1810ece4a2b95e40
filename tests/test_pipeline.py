"""The grain pipeline: determinism, exact resume, augmentation and exactly-once evaluation."""

import io

import numpy as np
import pytest
from PIL import Image

from bmcc.data import pipeline, splits


class FakeSource:
  """A random-access source like tfds.data_source: records with JPEG bytes and a label."""

  def __init__(self, n: int, num_classes: int = 21, size: int = 40):
    rng = np.random.default_rng(0)
    self.records = []
    for i in range(n):
      array = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
      buf = io.BytesIO()
      Image.fromarray(array).save(buf, "JPEG", quality=95)
      self.records.append({"image": buf.getvalue(), "label": i % num_classes,
                           "file_name": f"F{i:05d}".encode()})

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return self.records[index]


@pytest.fixture(scope="module")
def source():
  return FakeSource(50)


def _train(source, seed=0, **kwargs):
  kwargs.setdefault("mapping", pipeline.ClassMapping.create(None))
  return pipeline.train_dataset(source, image_size=16, batch_size=8, seed=seed, **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_same_seed_same_batches_and_different_seed_differs(source):
  a = _take(iter(_train(source, seed=3)), 8)  # 64 examples: more than one epoch of 50
  b = _take(iter(_train(source, seed=3)), 8)
  c = _take(iter(_train(source, seed=4)), 8)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert any(not np.array_equal(x["label"], z["label"]) for x, z in zip(a, c, strict=True))
  assert a[0]["image"].shape == (8, 16, 16, 3) and a[0]["image"].dtype == np.uint8
  assert a[0]["label"].dtype == np.int32


def test_each_epoch_is_a_permutation_and_epochs_differ(source):
  batches = _take(iter(_train(source, augment=False)), 25)  # 200 examples = 4 epochs of 50
  labels = np.concatenate([b["label"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])
  # Identify examples by their decoded pixels (augmentation off).
  keys = [img.tobytes() for img in images]
  epochs = [keys[i * 50:(i + 1) * 50] for i in range(4)]
  for epoch in epochs:
    assert len(set(epoch)) == 50  # every example once per epoch
  assert epochs[0] != epochs[1]  # reshuffled every epoch
  assert np.bincount(labels[:50], minlength=21).sum() == 50


def test_restoring_iterator_mid_epoch_gives_the_same_next_batches(source):
  iterator = iter(_train(source))
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 6)  # crosses the epoch boundary at example 50
  resumed = iter(_train(source))
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 6), strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_process_shards_partition_the_data(source):
  everything = {pipeline.decode_image(r["image"], 16).tobytes() for r in source.records}
  assert len(everything) == 50
  seen = []
  for index in range(2):
    ds = pipeline.eval_batches(source, mapping=pipeline.ClassMapping.create(None), image_size=16,
                               batch_size=8, process_index=index, process_count=2)
    batches = list(ds)
    assert len(batches) == 4  # ceil(ceil(50 / 2) / 8): equal on both processes
    seen.extend(img.tobytes() for b in batches for img in b["image"][b["mask"]])
  assert len(seen) == 50 and set(seen) == everything


def test_eval_covers_every_example_once_with_padding(source):
  batches = list(pipeline.eval_batches(source, mapping=pipeline.ClassMapping.create(None),
                                       image_size=16, batch_size=16))
  assert [b["image"].shape[0] for b in batches] == [16, 16, 16, 16]
  assert [int(b["mask"].sum()) for b in batches] == [16, 16, 16, 2]
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(labels, [i % 21 for i in range(50)])
  assert not batches[-1]["image"][2:].any()  # padding is zeros


def test_class_subset_filters_and_renumbers(source):
  mapping = pipeline.ClassMapping.create(["EBO", "ABE"])  # dataset labels 4 and 0
  np.testing.assert_array_equal(mapping.lookup_table()[:5], [1, -1, -1, -1, 0])
  assert mapping.names == ("Erythroblast", "Abnormal eosinophil")
  batches = list(pipeline.eval_batches(source, mapping=mapping, image_size=16, batch_size=4))
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  # Dataset labels 0 (ABE -> 1) and 4 (EBO -> 0) occur at i = 0, 4, 21, 25, 42, 46.
  np.testing.assert_array_equal(labels, [1, 0, 1, 0, 1, 0])
  train_labels = np.concatenate([b["label"] for b in _take(iter(_train(source, mapping=mapping)),
                                                             3)])
  assert set(train_labels.tolist()) <= {0, 1}
  with pytest.raises(ValueError, match="Valid codes are"):
    pipeline.ClassMapping.create(["BLA", "XYZ"])


def test_random_dihedral_covers_all_eight_orientations():
  image = np.arange(3 * 3 * 3, dtype=np.uint8).reshape(3, 3, 3)
  rng = np.random.default_rng(0)
  outputs = {pipeline.random_dihedral(image, rng).tobytes() for _ in range(200)}
  assert len(outputs) == 8


def test_decode_image_resizes_and_converts_modes():
  for mode in ("L", "RGBA", "RGB"):
    buf = io.BytesIO()
    Image.new(mode, (250, 180)).save(buf, "PNG")
    out = pipeline.decode_image(buf.getvalue(), 48)
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8


def test_normalize_images_is_exact():
  images = np.array([[[[200, 180, 200]]]], np.uint8)
  np.testing.assert_allclose(pipeline.normalize_images(images), 0.0)
  images = np.array([[[[250, 235, 245]]]], np.uint8)
  np.testing.assert_allclose(pipeline.normalize_images(images), 1.0)


def test_kfold_selection_partitions_and_reads_all_splits():
  names = [f"BLA/0001-1000/BLA_{i:05d}.jpg" for i in range(1, 2001)]
  k = 5
  tests = [[n for n in names if splits.Selection("test", i, k)(n)] for i in range(k)]
  assert sorted(sum(tests, [])) == sorted(names)  # the test folds partition the data
  for i in range(k):
    roles = {r: {n for n in names if splits.Selection(r, i, k)(n)} for r in splits.SPLITS}
    assert not roles["train"] & roles["validation"] and not roles["train"] & roles["test"]
    assert roles["train"] | roles["validation"] | roles["test"] == set(names)
    assert 0.15 < len(roles["test"]) / len(names) < 0.25
    assert 0.05 < len(roles["validation"]) / len(names) < 0.12
  plain = splits.Selection("validation")
  assert plain.splits() == ("validation",) and plain(names[0])
  assert splits.Selection("test", 1, 5).splits() == splits.SPLITS
  with pytest.raises(ValueError, match="both"):
    splits.Selection("train", 1, None)
  with pytest.raises(ValueError, match="fold=5"):
    splits.Selection("train", 5, 5)


def test_kfold_eval_reads_only_its_fold(source):
  sources = [FakeSource(10), FakeSource(7)]
  concat = pipeline.ConcatSource(sources)
  assert len(concat) == 17 and concat[12] is sources[1].records[2]
  selection = splits.Selection("test", 0, 2)
  batches = list(pipeline.eval_batches(concat, mapping=pipeline.ClassMapping.create(None),
                                       image_size=16, batch_size=4, selection=selection))
  kept = [r for r in sources[0].records + sources[1].records
          if selection(r["file_name"].decode())]
  assert 0 < len(kept) < 17
  assert sum(int(b["mask"].sum()) for b in batches) == len(kept)
