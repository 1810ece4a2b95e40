"""Default: ResNeXt-50 32x4d (Matek et al.'s architecture) from scratch on the real dataset.

  python main.py --config configs/default.py --workdir runs/default

224 px, bfloat16, batch 256, AdamW 1e-3 (weight decay 0.05 on kernels), 2 warm-up epochs then
cosine decay to 1% over 30 epochs, label smoothing 0.1, square-root class-balanced sampling, weight
average (decay 0.999). Put the download in `~/tensorflow_datasets/downloads/manual/` (or pass
--config.data.manual_dir); the first run prepares it. Durations are in epochs of the prepared
train split, so --config.batch_size needs no other change (scale learning_rate with it if you like).
Why this recipe: README, "Configs". Time per epoch and metrics: not yet measured (no GPU lent).
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
  # Protocol: 'stratified' (80/10/10 within each class, or k-fold below) or 'dinobloom' (test on
  # DinoBloom's published test files, validate on 10% of the rest); README, "Protocols".
  config.data.split = "stratified"
  # k-fold cross-validation (Matek et al. 2021 used 5 folds): test on fold `fold` of `num_folds`,
  # validate on 10% of the other folds, train on the rest; None: the prepared 80/10/10 splits.
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
  config.data.balance_alpha = 0.5
  # Class-weighted loss: weight n_c^-loss_weight_alpha, mean 1 over training examples; 0.0: none.
  config.data.loss_weight_alpha = 0.0
  config.data.num_workers = 8  # grain worker processes decoding images; 0: decode in-process

  # Pixels, square, of the model input (the images are 250 x 250): random crops of 70-100% of
  # the area resized to this in training, the whole image resized to it in evaluation. A ViT
  # takes multiples of its 14 px patch only (224, 238, 252, ...).
  config.image_size = 224
  config.model = "resnext50_32x4d"  # a name from bmcc.models.available()
  # Keyword arguments of the model's constructor (see bmcc/models).
  config.model_config = ml_collections.ConfigDict({
      "dtype": "bfloat16",  # compute dtype; parameters and batch-norm statistics stay float32
      "dropout": 0.0,  # dropout rate before the head
      "zero_init_residual": True,  # each residual block starts as the identity
  })

  # Pretrained backbone weights (README, "Pretrained backbones"): a local .pth/.safetensors file
  # or `hf-hub:owner/repo[/file]` (fetched only then; pip install 'bmcc[hub]'), loaded into the
  # model (all but its head) when a run starts from scratch, never on resume; None: from scratch.
  # Also what --mode=features embeds with.
  config.pretrained = placeholder(str)
  # Input normalisation: 'auto' (ImageNet statistics with `pretrained`, else the stain ones),
  # 'imagenet', 'stain' or 'matek' (the real cells' own statistics, bmcc.data.normalization); it
  # is stored with the checkpoints, which evaluate/predict follow.
  config.input_normalization = "auto"
  # --mode=features: the probes fitted once on the frozen features (bmcc.probe; README,
  # "Pretrained backbones"). The defaults are DinoBloom's evaluation.
  config.probe = ml_collections.ConfigDict()
  # Splits fitted on, together ('train' and/or 'validation', never 'test'); DinoBloom: all non-test.
  config.probe.fit_on = ("train", "validation")
  # Logistic regression's inverse L2 strength C: None: D * K / 100 (DinoBloom); a number; or
  # 'sweep': fitted on train for each C of c_sweep, the best validation balanced accuracy's C
  # refitted on fit_on (DINOv2).
  config.probe.c = placeholder(object)
  config.probe.c_sweep = (-6.0, 5.0, 45)  # sweep grid: 10^low .. 10^high, number of C (DINOv2's)
  config.probe.max_iter = 1000  # L-BFGS iterations of the logistic regression
  config.probe.knn_k = (1, 20)  # sklearn kNN (Euclidean, uniform votes), one probe per k; (): none
  # DINOv2's kNN (cosine, votes softmax(similarity / 0.07)), one probe per k; (): none.
  config.probe.weighted_knn_k = (20,)
  # Fine-tuning a pretrained ViT or ResNet (bmcc.finetune); any of these switches to its optimizer.
  config.finetune = ml_collections.ConfigDict()
  config.finetune.freeze_epochs = 0.0  # epochs during which only the head learns (backbone frozen)
  config.finetune.freeze_steps = placeholder(int)  # the same in steps; wins when set
  config.finetune.layer_decay = 1.0  # layer l of L learns at lr * layer_decay^(L - l); 1.0: off
  # Peak learning rate of the head, on the same warm-up and decay; None: learning_rate.
  config.finetune.head_learning_rate = placeholder(float)
  # The backbone frozen for the whole run (linear probe by gradient descent): only the head is
  # differentiated and has optimizer state.
  config.finetune.freeze_backbone = False

  config.batch_size = 256  # global batch, split over all devices; a multiple of the device count
  # Gradient accumulation: each step's batch in this many micro-batches of batch_size / k (one
  # compiled step, one update; batch norm then updates its statistics once per micro-batch).
  config.accumulate_steps = 1
  config.eval_batch_size = 512  # global evaluation batch; a multiple of the device count
  # Durations: in epochs of the run's training examples, or in steps; a `*_steps` value, when
  # set, takes precedence over its `*_epochs` twin.
  config.num_epochs = 30.0  # length of training
  config.num_train_steps = placeholder(int)

  # Layout of parameters, gradients, optimizer state and weight average over the devices (one
  # `data` mesh): 'data' (replicated) or 'fsdp' (arrays >= fsdp_min_bytes split; bmcc.sharding).
  config.sharding = "data"
  config.fsdp_min_bytes = 4 * 2**20  # smallest array FSDP splits, bytes (big_vision's 4 MiB)

  config.optimizer = "adamw"  # 'adam' or 'adamw'
  config.learning_rate = 1e-3 * config.batch_size / 256  # peak, 1e-3 per 256 images
  config.warmup_epochs = 2.0  # linear warm-up from 0 to the peak
  config.warmup_steps = placeholder(int)
  # Decay after warm-up: 'cosine', 'linear', 'exponential' or 'constant'.
  config.lr_schedule = "cosine"
  config.end_learning_rate_factor = 0.01  # final learning rate as a fraction of the peak
  config.weight_decay = 0.05  # decoupled weight decay (adamw only), not on biases or norms
  config.grad_clip_norm = 1.0  # clip the global gradient norm to this; None: no clipping
  config.label_smoothing = 0.1  # label smoothing of the cross-entropy
  # Exponential moving average of the weights (and batch-norm statistics) with this decay, e.g.
  # 0.999 (averages ~1,000 steps); validation, the best checkpoint, the test and prediction then
  # use the averaged weights. 0 or None: off.
  config.ema_decay = ml_collections.FieldReference(0.999, field_type=float)
  # Reduce-on-plateau (what the old project's callback did) and early stopping, both on validation
  # balanced accuracy, counted in evaluations (every eval_every_epochs); None: off. Early stopping
  # ends training; the final test evaluation then uses the best checkpoint.
  config.plateau_patience = placeholder(int)
  config.plateau_factor = 0.5  # learning-rate multiplier at each plateau
  config.early_stopping_patience = placeholder(int)
  config.min_delta = 0.0  # smallest change of the metric that counts as an improvement

  config.log_every_steps = 100  # training loss/accuracy to TensorBoard and the log
  # Validation evaluation (and a checkpoint with its metrics), and checkpoints in between.
  config.eval_every_epochs = 2.0
  config.eval_every_steps = placeholder(int)
  config.checkpoint_every_epochs = 1.0
  config.checkpoint_every_steps = placeholder(int)
  config.keep_checkpoints = 1  # latest checkpoints kept, besides the best by validation
  # Which checkpoint the final test evaluation uses: 'best' (by validation balanced accuracy)
  # or 'latest'. The test split never chooses anything.
  config.final_eval_checkpoint = "best"
  # Stop (with a checkpoint) at this step without changing the schedule; rerun to continue.
  config.stop_at_step = placeholder(int)
  return config
