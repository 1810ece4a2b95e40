"""The grain pipeline: determinism, exact resume, augmentation and exactly-once evaluation."""

import io
import pickle

import grain
import numpy as np
import pytest
import scipy.stats
from PIL import Image

from bmcc.data import pipeline, sampling, splits
from bmcc.data.decode import decode_image
from bmcc.data.normalization import normalize_images


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
  everything = {decode_image(r["image"], 16).tobytes() for r in source.records}
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
  names = np.concatenate([b["file_name"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(names, [f"F{i:05d}" for i in range(50)])  # decoded, in order
  assert (batches[-1]["file_name"][2:] == "").all()


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


def _png(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, "PNG")
  return buf.getvalue()


def test_decode_image_resizes_and_converts_modes_with_exact_pixels():
  grey = decode_image(_png(Image.new("L", (250, 180), 100)), 48)
  assert grey.shape == (48, 48, 3) and grey.dtype == np.uint8
  assert (grey == 100).all()
  clear = decode_image(_png(Image.new("RGBA", (250, 250), (10, 20, 30, 0))), 48)
  assert (clear == 255).all()  # transparent: the white of a smear's background
  opaque = decode_image(_png(Image.new("RGBA", (250, 250), (10, 20, 30, 255))), 48)
  assert (opaque == [10, 20, 30]).all()
  halves = Image.new("RGB", (100, 100), (255, 0, 0))
  halves.paste((0, 0, 255), (45, 0, 100, 100))
  out = decode_image(_png(halves), 10)  # a 10x shrink averages 10 x 10 blocks: only one blends
  np.testing.assert_array_equal(out[:, :4], [[[255, 0, 0]] * 4] * 10)
  np.testing.assert_array_equal(out[:, 5:], [[[0, 0, 255]] * 5] * 10)
  assert set(out[:, 4, 0]) == {128} and set(out[:, 4, 2]) == {128}  # 5 red + 5 blue columns


def test_normalize_images_is_exact():
  images = np.array([[[[200, 180, 200]]]], np.uint8)
  np.testing.assert_allclose(normalize_images(images), 0.0)
  images = np.array([[[[250, 235, 245]]]], np.uint8)
  np.testing.assert_allclose(normalize_images(images), 1.0)


def test_kfold_selection_partitions_and_reads_all_splits():
  names = np.array([f"BLA/0001-1000/BLA_{i:05d}.jpg" for i in range(1, 2001)])
  labels = np.full(len(names), 3)
  k = 5
  tests = [names[splits.Selection("test", i, k).keep(names, labels)] for i in range(k)]
  assert sorted(np.concatenate(tests)) == sorted(names)  # the test folds partition the data
  for i in range(k):
    roles = {r: set(names[splits.Selection(r, i, k).keep(names, labels)]) for r in splits.SPLITS}
    assert not roles["train"] & roles["validation"] and not roles["train"] & roles["test"]
    assert roles["train"] | roles["validation"] | roles["test"] == set(names)
    # Exactly 1/5 in test, 10% of the other 1,600 in validation.
    assert {r: len(v) for r, v in roles.items()} == {"train": 1440, "validation": 160,
                                                     "test": 400}
  plain = splits.Selection("validation")
  assert plain.splits() == ("validation",) and not plain.filters
  assert plain.keep(names[:3], labels[:3]).tolist() == [True] * 3
  assert splits.Selection("test", 1, 5).splits() == splits.SPLITS
  with pytest.raises(ValueError, match="both"):
    splits.Selection("train", 1, None)
  with pytest.raises(ValueError, match="fold=5"):
    splits.Selection("train", 5, 5)


def test_kfold_eval_reads_only_its_fold(source):
  sources = [FakeSource(10), FakeSource(7)]
  concat = grain.MapDataset.concatenate([grain.MapDataset.source(s) for s in sources])
  assert len(concat) == 17 and concat[12] is sources[1].records[2]
  selection = splits.Selection("test", 0, 2)
  mapping = pipeline.ClassMapping.create(None)
  indices, _ = pipeline.select_records(concat, mapping, selection.keep)
  batches = list(pipeline.eval_batches(concat, mapping=mapping, image_size=16, batch_size=4,
                                       indices=indices))
  records = sources[0].records + sources[1].records
  mask = selection.keep([r["file_name"].decode() for r in records],
                        [r["label"] for r in records])
  # Labels 7-9 have one record: fold 0 (cut at round(1/2) = 1). Labels 0-6 have two records with
  # the same stem (F00000 .. F00006, one per source): equal keys keep the input order, so the
  # first source's goes to fold 0. Fold 0 is exactly the first source.
  assert indices.tolist() == np.flatnonzero(mask).tolist() == list(range(10))
  assert sum(int(b["mask"].sum()) for b in batches) == 10


def _assert_same_batches(expected, actual):
  assert len(expected) == len(actual)
  for x, y in zip(expected, actual, strict=True):
    np.testing.assert_array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
    np.testing.assert_array_equal(np.asarray(x["label"]), np.asarray(y["label"]))


def test_same_batches_for_any_worker_count_and_exact_resume_with_workers(source):
  reference = _take(iter(_train(source, seed=5)), 9)  # crosses the epoch boundary at example 50
  one = iter(_train(source, seed=5, num_workers=1))
  _assert_same_batches(reference[:4], _take(one, 4))
  one.close()
  two = iter(_train(source, seed=5, num_workers=2))
  _assert_same_batches(reference[:3], _take(two, 3))
  state = two.get_state()  # mid-epoch, mid-way through the workers' round
  _assert_same_batches(reference[3:9], _take(two, 6))
  two.close()
  resumed = iter(_train(source, seed=5, num_workers=2))
  resumed.set_state(state)
  _assert_same_batches(reference[3:9], _take(resumed, 6))
  resumed.close()


def test_class_subset_and_balanced_streams(source):
  # Worker processes see these streams exactly as the main process does (the sampler is a pure
  # function of seed and position, and pickles), like the plain stream tested above; not repeated
  # here because every worker start costs seconds.
  mapping = pipeline.ClassMapping.create(["EBO", "ABE", "BLA"])
  kwargs = dict(mapping=mapping, balance_alpha=1.0, seed=2)
  reference = _take(iter(_train(source, **kwargs)), 5)
  labels = np.concatenate([b["label"] for b in reference])
  assert set(labels.tolist()) == {0, 1, 2}
  _assert_same_batches(reference, _take(iter(_train(source, **kwargs)), 5))
  # Natural order over the subset: every kept example once per epoch (3 classes x 2 or 3).
  natural = np.concatenate([b["label"] for b in _take(iter(_train(source, mapping=mapping,
                                                                    augment=False)), 7)])
  kept = [pipeline.ClassMapping.create(["EBO", "ABE", "BLA"]).lookup_table()[i % 21]
          for i in range(50)]
  kept = np.array([k for k in kept if k >= 0])
  np.testing.assert_array_equal(np.sort(natural[:len(kept)]), np.sort(kept))


def test_balanced_stream_resumes_exactly(source):
  iterator = iter(_train(source, balance_alpha=0.5))
  _take(iterator, 2)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  resumed = iter(_train(source, balance_alpha=0.5))
  resumed.set_state(state)
  _assert_same_batches(expected, _take(resumed, 3))


class _Numbered:
  """Element i -> a batch of label i; raises at `fail_at` (picklable)."""

  def __init__(self, fail_at: int | None = None):
    self.fail_at = fail_at

  def __call__(self, i: int) -> dict:
    if i == self.fail_at:
      raise RuntimeError("broken record")
    return {"label": np.full(4, i, np.int32)}


def _mesh_sharding():
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  return NamedSharding(mesh, P("data"))


def test_device_iterator_state_is_that_of_the_last_consumed_batch(source):
  import jax

  sharding = _mesh_sharding()
  reference = _take(iter(_train(source, seed=9)), 8)
  prefetched = pipeline.device_iterator(_train(source, seed=9), sharding, size=3)
  initial = prefetched.get_state()
  first = _take(prefetched, 3)
  assert isinstance(first[0]["image"], jax.Array) and first[0]["image"].sharding == sharding
  assert first[0]["image"].dtype == np.uint8 and first[0]["label"].shape == (8,)
  _assert_same_batches(reference[:3], first)
  state = prefetched.get_state()  # the reader is ahead by up to 3 more batches
  check = iter(_train(source, seed=9))
  _take(check, 3)
  assert state == check.get_state()  # exactly the plain stream's state after 3 batches
  resumed = iter(_train(source, seed=9))
  resumed.set_state(state)
  _assert_same_batches(reference[3:6], _take(resumed, 3))
  _assert_same_batches(reference[3:5], _take(prefetched, 2))
  prefetched.set_state(state)  # rewind: read-ahead dropped
  _assert_same_batches(reference[3:8], _take(prefetched, 5))
  prefetched.set_state(initial)
  _assert_same_batches(reference[:2], _take(prefetched, 2))
  prefetched.close()

  numbered = grain.MapDataset.range(3).map(_Numbered()).to_iter_dataset()
  finite = pipeline.device_iterator(numbered, sharding, size=2)
  assert [int(b["label"][0]) for b in finite] == [0, 1, 2]
  broken = pipeline.device_iterator(
      grain.MapDataset.range(5).map(_Numbered(fail_at=2)).to_iter_dataset(), sharding, size=4)
  _take(broken, 2)
  with pytest.raises(RuntimeError, match="broken record"):
    next(broken)


def test_device_iterator_round_trips_through_a_checkpoint(source, tmp_path):
  import optax
  from flax import nnx

  from bmcc import checkpointing

  sharding = _mesh_sharding()
  model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  reference = _take(iter(_train(source, seed=4)), 5)
  prefetched = pipeline.device_iterator(_train(source, seed=4), sharding, size=2)
  _take(prefetched, 2)
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", asynchronous=False)
  ckpt.save(1, model=model, optimizer=optimizer, ema_model=None, data_iterator=prefetched,
            metadata={"note": "test"})
  ckpt.wait_until_finished()
  restored = pipeline.device_iterator(_train(source, seed=4), sharding, size=2)
  ckpt.restore(1, model=model, optimizer=optimizer, data_iterator=restored)
  _assert_same_batches(reference[2:5], _take(restored, 3))
  ckpt.close()
  prefetched.close()
  restored.close()


# Class counts of a small imbalanced training set.
COUNTS = np.array([2000, 600, 150, 40, 9, 1])


def _draw_counts(sampler, n):
  labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
  drawn = labels[[sampler[i] for i in range(n)]]
  return np.bincount(drawn, minlength=len(COUNTS))


# Chi-square goodness of fit of the drawn class counts to the target probabilities, at a stated
# significance: with draws i.i.d. from the target, a correct sampler fails with probability ALPHA
# for a random seed; the seed is fixed, so the test is deterministic. 50k draws put at least 17
# expected draws in the rarest class (p = 1/2800 at alpha 0), enough for the chi-square
# approximation; at alpha 0.5 the rarest class has p = 0.011 (550 expected).
SIGNIFICANCE = 0.001
NUM_DRAWS = 50_000


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_balanced_sampler_class_frequencies_fit_the_target(alpha):
  labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
  sampler = sampling.BalancedSampler(labels, alpha=alpha, seed=0, chunk_size=1000)
  target = COUNTS ** (1.0 - alpha) / (COUNTS ** (1.0 - alpha)).sum()  # alpha=1: uniform
  np.testing.assert_allclose(sampler.probabilities, target)
  observed = _draw_counts(sampler, NUM_DRAWS)
  assert scipy.stats.chisquare(observed, target * NUM_DRAWS).pvalue > SIGNIFICANCE
  # The test has the power to tell alpha from a neighbouring alpha 0.1 away.
  for other in (alpha - 0.1, alpha + 0.1):
    wrong = COUNTS ** (1.0 - other) / (COUNTS ** (1.0 - other)).sum()
    assert scipy.stats.chisquare(observed, wrong * NUM_DRAWS).pvalue < SIGNIFICANCE, other


def test_balanced_sampler_is_a_pure_function_of_seed_and_position():
  labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
  a = sampling.BalancedSampler(labels, alpha=1.0, seed=3, chunk_size=64)
  b = pickle.loads(pickle.dumps(a))  # as in a grain worker
  positions = [5, 900, 64, 63, 10_000, 5]
  assert [a[i] for i in positions] == [b[i] for i in positions]
  assert [a[i] for i in range(200)] != [
      sampling.BalancedSampler(labels, alpha=1.0, seed=3, stream=1, chunk_size=64)[i]
      for i in range(200)]
  assert len(a) > 10 ** 15 and a[0:10:2][1] == a[2]


def test_class_weights_are_exact():
  np.testing.assert_allclose(sampling.class_weights([1, 4, 16], 0.0), [1.0, 1.0, 1.0])
  np.testing.assert_allclose(sampling.class_weights([1, 4, 16], 0.5), [3.0, 1.5, 0.75])
  np.testing.assert_allclose(sampling.class_weights([1, 4, 16], 1.0), [7.0, 1.75, 0.4375])
  weights = sampling.class_weights([10, 40, 0, 50], 1.0)
  np.testing.assert_allclose(weights, [10 / 3, 5 / 6, 0.0, 2 / 3], rtol=1e-6)
  assert weights.dtype == np.float32
  np.testing.assert_allclose((np.array([10, 40, 0, 50]) * weights).sum() / 100, 1.0, rtol=1e-6)
  # Normalised over the balanced stream instead (uniform over the 3 classes).
  uniform = sampling.class_probabilities([1, 4, 16], 1.0)
  np.testing.assert_allclose(uniform, [1 / 3] * 3)
  np.testing.assert_allclose(sampling.class_weights([1, 4, 16], 1.0, uniform),
                             [16 / 7, 4 / 7, 1 / 7], rtol=1e-6)
  with pytest.raises(ValueError):
    sampling.class_weights([0, 0], 1.0)


class _CountingSource(FakeSource):
  def __init__(self, n):
    super().__init__(n)
    self.reads = 0

  def __getitem__(self, index):
    self.reads += 1
    return super().__getitem__(index)


def test_record_index_is_read_once_and_cached(source, tmp_path):
  path = tmp_path / "sub" / "labels-train.npz"
  labels, names = sampling.read_record_index(source, path)
  np.testing.assert_array_equal(labels, [i % 21 for i in range(50)])
  assert names[7] == "F00007" and path.exists()
  counting = _CountingSource(50)
  again, _ = sampling.read_record_index(counting, path)
  np.testing.assert_array_equal(again, labels)
  assert counting.reads == 16  # the spot checks only
  counting.records[29]["label"] = 3  # the same length, other content (a spot-checked record)
  relabelled, _ = sampling.read_record_index(counting, path)
  assert relabelled[29] == 3 and counting.reads > 16 + 50
  stale, _ = sampling.read_record_index(FakeSource(30), path)  # another length: read again
  assert len(stale) == 30
  indices, run_labels = pipeline.select_records(
      source, pipeline.ClassMapping.create(["EBO", "ABE"]))
  np.testing.assert_array_equal(indices, [0, 4, 21, 25, 42, 46])  # labels 0 (ABE) or 4 (EBO)
  np.testing.assert_array_equal(run_labels, [1, 0, 1, 0, 1, 0])
