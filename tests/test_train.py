"""Train step, schedule, optimizer and config validation."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from bmcc import checkpointing, config_validation, steps
from configs import demo


def _config(**overrides) -> ml_collections.ConfigDict:
  config = demo.get_config()
  config.model_config.features = (4, 8)
  config.model_config.dense = 8
  config.model_config.dropout = 0.2
  config.batch_size = 8
  for key, value in overrides.items():
    config[key] = value
  return config


def _lr(config):
  return steps.create_learning_rate_fn(config, steps.resolve_durations(config, 100))


def _replicated_model_and_optimizer(config, mesh):
  model = steps.create_model(config, 21)
  optimizer = nnx.Optimizer(model, steps.create_optimizer(config, _lr(config)), wrt=nnx.Param)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  nnx.update((model, optimizer), jax.device_put(nnx.state((model, optimizer)), replicated))
  return model, optimizer, replicated


def _run_steps(devices, batches, config):
  mesh = steps.create_mesh(devices)
  model, optimizer, _ = _replicated_model_and_optimizer(config, mesh)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  losses = []
  with jax.set_mesh(mesh):
    for step, (images, labels) in enumerate(batches, start=1):
      out = steps.train_step(model, optimizer, jax.device_put(images, sharding),
                             jax.device_put(labels, sharding),
                             jax.random.fold_in(jax.random.key(1), step))
      losses.append(float(out["loss"]))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  return losses, params, model.blocks[0].conv1.kernel.get_value().sharding


def test_train_step_on_four_devices_matches_one_device():
  assert jax.device_count() >= 4, "conftest sets 4 fake CPU devices"
  rng = np.random.default_rng(0)
  batches = [(rng.integers(0, 255, (8, 24, 24, 3), dtype=np.uint8),
              rng.integers(0, 21, (8,), dtype=np.int32)) for _ in range(4)]
  config = _config(warmup_steps=0)
  losses1, params1, _ = _run_steps(jax.devices()[:1], batches, config)
  losses4, params4, sharding4 = _run_steps(jax.devices()[:4], batches, config)
  assert sharding4.mesh.size == 4 and sharding4.spec == jax.sharding.PartitionSpec()
  # Same maths (batch-norm statistics over the global batch, the same dropout masks); only the
  # order of floating-point reductions differs. Tolerance: 1e-5 relative.
  np.testing.assert_allclose(losses1, losses4, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params1, params4)
  assert losses1[0] != losses1[-1]  # the parameters did move


def test_learning_rate_schedule_values():
  config = _config(learning_rate=1e-3, warmup_steps=10, num_train_steps=110,
                   end_learning_rate_factor=0.01, lr_schedule="cosine")
  lr = _lr(config)
  np.testing.assert_allclose(
      [lr(0), lr(5), lr(10), lr(60), lr(110)],
      [0.0, 5e-4, 1e-3, 1e-3 * (0.01 + 0.99 * 0.5), 1e-5], rtol=1e-6)
  config.lr_schedule = "linear"
  lr = _lr(config)
  np.testing.assert_allclose([lr(10), lr(60), lr(110)], [1e-3, 5.05e-4, 1e-5], rtol=1e-6)
  config.lr_schedule = "constant"
  lr = _lr(config)
  np.testing.assert_allclose([lr(5), lr(100)], [5e-4, 1e-3], rtol=1e-6)


def test_durations_in_epochs_follow_the_batch_size_and_steps_win():
  from configs import default

  config = default.get_config()  # 30 epochs, 2 warm-up, eval every 2, checkpoint every 1
  assert steps.resolve_durations(config, steps_per_epoch=535) == steps.Durations(
      total=16_050, warmup=1_070, eval_every=1_070, checkpoint_every=535)
  # Twice the batch: half the steps per epoch, the same epochs.
  assert steps.resolve_durations(config, steps_per_epoch=267) == steps.Durations(
      total=8_010, warmup=534, eval_every=534, checkpoint_every=267)
  config.num_train_steps, config.eval_every_steps = 100, 7  # a step count, when set, wins
  config.warmup_steps = 10
  assert steps.resolve_durations(config, 535) == steps.Durations(100, 10, 7, 535)
  config.eval_every_steps = None
  config.eval_every_epochs = 0.001  # never below one step
  assert steps.resolve_durations(config, 535).eval_every == 1
  config.warmup_steps = None
  with pytest.raises(ValueError, match="Warm-up"):  # 2 warm-up epochs > 100 steps
    steps.resolve_durations(config, 535)
  config.num_epochs, config.warmup_epochs = 3.0, 4.0
  config.num_train_steps = None
  with pytest.raises(config_validation.ConfigError, match="warmup_epochs"):
    config_validation.validate(config, "/tmp/bmcc-durations")


def test_weight_decay_only_on_kernels():
  config = _config(weight_decay=0.5, grad_clip_norm=None, learning_rate=0.1, warmup_steps=0,
                   lr_schedule="constant")
  params = {"kernel": np.ones((2, 2), np.float32), "bias": np.ones((2,), np.float32)}
  tx = steps.create_optimizer(config, _lr(config))
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((2, 2)))  # decayed
  np.testing.assert_allclose(updates["bias"], 0.0)  # not decayed


@pytest.mark.parametrize("override, message", [
    ({"batch_size": 6}, "multiple of the device count"),
    ({"eval_batch_size": 0}, "multiple of the device count"),
    ({"model": "vgg"}, "Unknown model 'vgg'"),
    ({"image_size": 8}, "image_size"),
    ({"warmup_steps": 10_000}, "warmup_steps"),
    ({"lr_schedule": "step"}, "lr_schedule"),
    ({"final_eval_checkpoint": "first"}, "final_eval_checkpoint"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"ema_decay": -0.1}, "ema_decay"),
])
def test_bad_configs_fail_before_any_work(tmp_path, override, message):
  config = _config()
  for key, value in override.items():
    config[key] = value
  with pytest.raises(config_validation.ConfigError, match=message):
    config_validation.validate(config, str(tmp_path))


def test_image_too_small_for_the_simple_cnn_blocks(tmp_path):
  config = _config(image_size=16)
  config.model_config.features = (8, 8, 8, 8, 8)  # 16 -> 8 -> 4 -> 2 -> 1 -> 0 pixels
  with pytest.raises(config_validation.ConfigError, match="use at least 32"):
    config_validation.validate(config, str(tmp_path))
  config.image_size = 32
  config_validation.validate(config, str(tmp_path))


def test_bad_class_list_and_workdir(tmp_path):
  config = _config()
  config.data.classes = ("BLA", "XYZ")
  with pytest.raises(config_validation.ConfigError, match="Valid codes are"):
    config_validation.validate(config, str(tmp_path))
  config.data.classes = None
  not_a_folder = tmp_path / "file"
  not_a_folder.write_text("x")
  with pytest.raises(config_validation.ConfigError, match="not a writable folder"):
    config_validation.validate(config, str(not_a_folder))


def test_checkpoint_metadata_mismatch_is_an_error():
  saved = {"model": "simple_cnn", "model_config": {"features": [4, 8]}, "classes": ["BLA", "EBO"],
           "image_size": 48}
  same = {"model": "simple_cnn", "model_config": {"features": (4, 8)}, "classes": ("BLA", "EBO"),
          "image_size": 48}
  checkpointing.check_compatible(saved, same, "w")  # tuples vs lists: compatible
  other = dict(same, classes=("BLA",))
  with pytest.raises(config_validation.ConfigError, match="classes"):
    checkpointing.check_compatible(saved, other, "w")


def test_ema_follows_the_weights_with_its_warmed_up_decay_and_stays_replicated():
  config = _config(warmup_steps=0, ema_decay=0.2)
  mesh = steps.create_mesh(jax.devices()[:4])
  model, optimizer, replicated = _replicated_model_and_optimizer(config, mesh)
  ema = steps.create_ema(config, model)
  ema_model = ema.apply_to(model)
  tracked = (nnx.Param, nnx.BatchStat)

  def numpy_state(m):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m, tracked)))

  expected = numpy_state(model)
  rng = np.random.default_rng(0)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  with jax.set_mesh(mesh):
    for step in range(1, 4):
      images = rng.integers(0, 255, (8, 24, 24, 3), dtype=np.uint8)
      labels = rng.integers(0, 21, (8,), dtype=np.int32)
      steps.train_step(model, optimizer, jax.device_put(images, sharding),
                       jax.device_put(labels, sharding), jax.random.key(step), None, ema)
      # ema <- d_t * ema + (1 - d_t) * weights after the update, batch-norm statistics included,
      # d_t = min(0.2, (1 + t) / (10 + t)): 2/11, then the configured 0.2 from step 2 on.
      d = min(0.2, (1 + step) / (10 + step))
      expected = jax.tree.map(lambda e, w, d=d: d * e + (1 - d) * w, expected, numpy_state(model))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               numpy_state(ema_model), expected)
  kernel = ema_model.blocks[0].conv1.kernel.get_value()
  assert kernel.sharding.is_equivalent_to(replicated, kernel.ndim)
  assert not np.allclose(kernel, model.blocks[0].conv1.kernel.get_value())
  # The model itself is untouched by the average: it is what the optimizer moved.
  assert np.asarray(model.blocks[0].norm1.mean.get_value()).any()


def test_ema_decay_warms_up_to_the_configured_one():
  # TensorFlow's ExponentialMovingAverage(num_updates=t): min(d, (1 + t) / (10 + t)).
  got = [float(steps.ema_decay_at(0.99, t)) for t in (1, 10, 100, 890, 891, 10_000)]
  np.testing.assert_allclose(got, [2 / 11, 11 / 20, 101 / 110, 891 / 900, 0.99, 0.99], rtol=1e-6)
  # So after 132 steps at 0.99 the random initialisation's share of the average is ~0, not
  # 0.99 ** 132 = 26%: the product of the decays (each step keeps d_t of the average).
  share = np.prod([float(steps.ema_decay_at(0.99, t)) for t in range(1, 133)])
  assert share < 1e-3, share


def test_no_ema_without_a_decay():
  linear = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  assert steps.create_ema(_config(), linear) is None
  assert steps.create_ema(_config(ema_decay=0.0), linear) is None
