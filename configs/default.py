"""Default recipe on the real dataset: SimpleCNN at native resolution (250 px), AdamW, cosine.

Put the download (the Kaggle zip as downloaded, or the extracted folder) in
`~/tensorflow_datasets/downloads/manual/` (or set --config.data.manual_dir), then:

  python main.py --config configs/default.py --workdir runs/default

The first run prepares the dataset (once, a few minutes), then trains for 30 epochs of the
~137k training images. The expected time and metrics on a named GPU are not measured yet.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  """The default configuration; every other config starts from it and overrides."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # seeds initialisation, shuffling, augmentation and dropout

  config.data = ml_collections.ConfigDict()
  # Where TFDS keeps prepared datasets; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.data.data_dir = placeholder(str)
  # Where the user put the download (zip or folder); None: <data_dir>/downloads/manual.
  config.data.manual_dir = placeholder(str)
  # Class codes to train on (labels renumbered in this order, names kept); None: all 21.
  config.data.classes = placeholder(tuple)
  # Synthetic dataset written by bmcc itself instead of the real one (demo and tests); None: real.
  config.data.synthetic = None
  # Where the synthetic dataset is written and prepared; None: ~/.cache/bmcc.
  config.data.cache_dir = placeholder(str)
  # k-fold cross-validation (Matek et al. 2021 used 5 folds): test on fold `fold` of `num_folds`,
  # validate on ~10% of the other folds, train on the rest; None: the prepared 80/10/10 splits.
  config.data.num_folds = placeholder(int)
  config.data.fold = placeholder(int)
  config.data.augment = True  # training augmentation as set below; False: the evaluation resize
  config.data.crop_scale = (0.7, 1.0)  # random crop area, fraction of the image; (1.0, 1.0): none
  config.data.crop_ratio = (3 / 4, 4 / 3)  # random crop aspect ratio range, width / height
  config.data.color_jitter = 0.1  # brightness, contrast, saturation factors uniform in 1 +- this
  config.data.hue_jitter = 0.02  # hue rotation uniform in +- this, turns (0.02 = 7.2 degrees)
  config.data.blur_prob = 0.0  # probability of a Gaussian blur per training image
  config.data.blur_sigma = (0.1, 1.0)  # Gaussian blur sigma range, pixels of the model input
  # Class-balanced sampling: an example of class c (n_c training images) is drawn with weight
  # n_c^-balance_alpha; 0.0: natural (shuffled epochs), 1.0: uniform over classes.
  config.data.balance_alpha = 0.0
  # Class-weighted loss: weight n_c^-loss_weight_alpha, mean 1 over training examples; 0.0: none.
  config.data.loss_weight_alpha = 0.0
  config.data.num_workers = 2  # grain worker processes decoding images; 0: decode in-process

  config.image_size = 250  # pixels, square; the images are 250 x 250
  config.model = "simple_cnn"  # a name from bmcc.models.available()
  config.model_config = ml_collections.ConfigDict({
      "features": (32, 64, 128, 256, 512),  # channels of each conv block (each halves the size)
      "dense": 256,  # width of the dense layer before the classifier
      "dropout": 0.3,  # dropout rate before the classifier
      "dtype": "float32",  # compute dtype; parameters stay float32
  })

  config.batch_size = 128  # global batch, split over all devices; a multiple of the device count
  config.eval_batch_size = 256  # global evaluation batch; a multiple of the device count
  config.num_train_steps = 32_000  # about 30 epochs of ~137k training images at batch 128

  config.optimizer = "adamw"  # 'adam' or 'adamw'
  config.learning_rate = 1e-3  # peak learning rate, reached at the end of warm-up
  config.warmup_steps = 1_000  # linear warm-up from 0 to the peak
  # Decay after warm-up: 'cosine', 'linear', 'exponential' or 'constant'.
  config.lr_schedule = "cosine"
  config.end_learning_rate_factor = 0.01  # final learning rate as a fraction of the peak
  config.weight_decay = 1e-4  # decoupled weight decay (adamw only), not on biases or norms
  config.grad_clip_norm = 1.0  # clip the global gradient norm to this; None: no clipping
  config.label_smoothing = 0.0  # label smoothing of the cross-entropy
  # Exponential moving average of the weights (and batch-norm statistics) with this decay, e.g.
  # 0.999 (averages ~1,000 steps); validation, the best checkpoint, the test and prediction then
  # use the averaged weights. None: off.
  config.ema_decay = placeholder(float)
  # Reduce-on-plateau (what the old project's callback did) and early stopping, both on validation
  # balanced accuracy, counted in evaluations (every eval_every_steps); None: off. Early stopping
  # ends training; the final test evaluation then uses the best checkpoint.
  config.plateau_patience = placeholder(int)
  config.plateau_factor = 0.5  # learning-rate multiplier at each plateau
  config.early_stopping_patience = placeholder(int)
  config.min_delta = 0.0  # smallest change of the metric that counts as an improvement

  config.log_every_steps = 100  # training loss/accuracy to TensorBoard and the log
  config.eval_every_steps = 2_000  # validation evaluation (and a checkpoint with its metrics)
  config.checkpoint_every_steps = 1_000  # checkpoints in between evaluations
  config.keep_checkpoints = 1  # latest checkpoints kept, besides the best by validation
  # Which checkpoint the final test evaluation uses: 'best' (by validation balanced accuracy)
  # or 'latest'. The test split never chooses anything.
  config.final_eval_checkpoint = "best"
  # Stop (with a checkpoint) at this step without changing the schedule; rerun to continue.
  config.stop_at_step = placeholder(int)
  return config
