"""DinoBloom-S (ViT-S/14, DINOv2 trained on blood and bone-marrow cells): frozen features + probes.

  pip install 'bmcc[hub]'   # the weights below are fetched from the Hugging Face hub once
  python main.py --config configs/dinobloom_s_probe.py --workdir runs/dinobloom_s --mode=features

or, with the original checkpoint from zenodo (DinoBloom-S.pth, the `teacher` of its DINOv2 run;
nothing to install, nothing downloaded):

  python main.py --config configs/dinobloom_s_probe.py --workdir runs/dinobloom_s --mode=features \\
      --config.pretrained=/path/to/DinoBloom-S.pth

`--mode=features` embeds the train, validation and test splits at 224 px with the final-norm CLS
token (384 dimensions; ImageNet normalisation, as the weights expect) into
`features_<split>.npz`, then fits DinoBloom's probes on the train split: logistic regression
(`eval_<split>.json`) and a k = 20 weighted kNN (`eval_<split>_knn.json`), for validation and
test. This is how DinoBloom reports its backbones (Koch et al., MICCAI 2024: DinoBloom-G's linear
probe on this dataset, weighted F1 84.9 / balanced accuracy 69.3), and on the same test images:
`data.split = "dinobloom"` (README, "Protocols"). A baseline for what the fine-tuned models must
beat, at the cost of one forward pass per image.

`--mode=train` with this config trains only a linear head on the frozen backbone (the backbone
stays frozen for all of `num_epochs`), with augmentation and balanced sampling: the probe by
gradient descent.

Time (features of the ~171k images, float32 on one H100/H200: 12.6 GFLOP per image, ~2e15 FLOP
in all, so the JPEG decoding on the host likely sets the pace) and metrics: not yet measured (no
GPU lent).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = "vit_small_patch14"
  config.pretrained = "hf-hub:1aurent/vit_small_patch14_224.dinobloom"
  config.image_size = 224  # DinoBloom was trained at 224 px (a 16 x 16 patch grid)
  # DinoBloom's own test images, so the probe's numbers sit beside the published ones.
  config.data.split = "dinobloom"
  # float32 features (computed once: fidelity over speed); ViT keys only, default's are a ResNet's.
  config.model_config = ml_collections.ConfigDict({"dtype": "float32", "dropout": 0.0})
  config.eval_batch_size = 512
  # --mode=train: a linear head on the frozen backbone.
  config.num_epochs = 10.0
  config.warmup_epochs = 1.0
  config.finetune.freeze_epochs = config.num_epochs  # the whole run
  config.learning_rate = 1e-3
  config.ema_decay = None
  return config
