"""ResNet-50 from torchvision's ImageNet weights, fine-tuned: the transfer baseline for the ViTs.

  pip install 'bmcc[hub]'   # the weights below are fetched from the Hugging Face hub once
  python main.py --config configs/resnet50_imagenet.py --workdir runs/resnet50_imagenet

or with a local file: `--config.pretrained=/path/to/resnet50-0676ba61.pth` (torchvision's) or any
timm ResNet-50 `.safetensors`.

`configs/resnet50.py`'s recipe (224 px, bf16, batch 256, AdamW, cosine, label smoothing 0.1,
square-root balanced sampling, EMA 0.999), but starting from ImageNet instead of from scratch,
over 15 epochs at a lower rate: the head alone for the first epoch, then the stages at 5e-4 x
0.8^(4 - stage) (the stem at 0.8^4 = 41%), the head at 10x. While the backbone is frozen its
batch-norm running statistics still follow the bone-marrow batches (train mode): the
normalisation adapts to the new images before any weight moves. Inputs are normalised with
ImageNet statistics (stored with the checkpoint).

Why: it separates what pretraining brings from what the architecture brings, against
`configs/resnet50.py` (the same model from scratch) and `configs/dinobloom_b_finetune.py`
(in-domain pretraining).

Time per epoch: as `configs/resnet50.py` (24.1 GFLOP per image per step); metrics: not yet
measured (no GPU lent).
"""

import ml_collections

from configs import resnet50


def get_config() -> ml_collections.ConfigDict:
  config = resnet50.get_config()
  config.pretrained = "hf-hub:timm/resnet50.tv_in1k"
  config.learning_rate = 5e-4 * config.batch_size / 256  # the last stage's peak
  config.finetune.head_learning_rate = 10 * config.learning_rate
  config.finetune.layer_decay = 0.8
  config.finetune.freeze_epochs = 1.0
  config.num_epochs = 15.0
  config.warmup_epochs = 2.0
  return config
