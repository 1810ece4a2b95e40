"""DinoBloom-B (ViT-B/14) fine-tuned end to end: layer-wise decay, frozen first epoch, bf16.

  pip install 'bmcc[hub]'   # the weights below are fetched from the Hugging Face hub once
  python main.py --config configs/dinobloom_b_finetune.py --workdir runs/dinobloom_b

or with the zenodo checkpoint (nothing downloaded): `--config.pretrained=/path/to/DinoBloom-B.pth`.
On several GPUs or hosts the same command (the batch of 256 is split over all devices).

Recipe (BEiT / DINOv2-style fine-tuning): AdamW (weight decay 0.05, not on norms, biases, tokens
or the position embedding), 10 epochs, cosine decay after 2 warm-up epochs, batch 256 at 224 px in
bfloat16. The first epoch trains the freshly initialised head alone (backbone frozen, bit for
bit), so its random gradients never reach the pretrained features; then every layer learns, block
i of 12 at 2e-4 x 0.75^(13 - i) (the embeddings at 0.75^13 = 2.4% of the top rate), the head at
10x (2e-3). Stochastic depth 0.1, label smoothing 0.1, square-root class-balanced sampling and the
weight average (EMA 0.999) as in `configs/default.py`; the best checkpoint by validation balanced
accuracy is tested. Inputs are normalised with ImageNet statistics (the weights expect them;
stored with the checkpoint, so evaluate and predict follow).

Why: DinoBloom's features were learnt on ~380k images of blood and bone-marrow cells from public
datasets, so they start far closer to the task than ImageNet's; layer decay keeps the early,
generic layers close to them while the head and the last blocks adapt. Compare with
`configs/dinobloom_s_probe.py` (frozen features) and `configs/resnet50_imagenet.py`.

Time per epoch and metrics: not yet measured (no GPU lent). Cost: 47.1 GFLOP per image forward
at 224 px (XLA's count; 257 tokens), about 3x that per training step, so ~2e16 FLOP per epoch of
~137k images: 20 s at an H100's dense bf16 peak, about a minute at a plausible 30-40% of it.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = "vit_base_patch14"
  config.pretrained = "hf-hub:1aurent/vit_base_patch14_224.dinobloom"
  config.image_size = 224
  # ViT keys only (default's are a ResNet's).
  config.model_config = ml_collections.ConfigDict({
      "dtype": "bfloat16",  # compute dtype; parameters stay float32
      "drop_path_rate": 0.1,  # stochastic depth of the last block, rising linearly from 0
      "dropout": 0.0,  # dropout before the head
  })
  config.optimizer = "adamw"
  config.learning_rate = 2e-4 * config.batch_size / 256  # the last block's peak
  config.finetune.head_learning_rate = 10 * config.learning_rate
  config.finetune.layer_decay = 0.75
  config.finetune.freeze_epochs = 1.0
  config.num_epochs = 10.0
  config.warmup_epochs = 2.0  # one epoch of the head alone, then one of the whole model
  config.lr_schedule = "cosine"
  config.data.balance_alpha = 0.5  # square-root class-balanced sampling
  config.eval_every_epochs = 1.0
  return config
