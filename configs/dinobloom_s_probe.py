"""DinoBloom-S (ViT-S/14, DINOv2 trained on blood and bone-marrow cells): frozen features + probes.

  pip install 'bmcc[hub]'   # the weights below are fetched from the Hugging Face hub once
  python main.py --config configs/dinobloom_s_probe.py --workdir runs/dinobloom_s --mode=features

or, with the original checkpoint from zenodo (DinoBloom-S.pth, the `teacher` of its DINOv2 run;
nothing to install, nothing downloaded):

  python main.py --config configs/dinobloom_s_probe.py --workdir runs/dinobloom_s --mode=features \\
      --config.pretrained=/path/to/DinoBloom-S.pth

`--mode=features` embeds the train, validation and test splits at 224 px with the final-norm CLS
token (384 dimensions; ImageNet normalisation, as the weights expect) into
`features_<split>.npz`, then fits DinoBloom's probes ONCE on train + validation (every image not
in DinoBloom's test list, as DinoBloom fits them; `probe.fit_on`) and reports them on validation
(in-sample: it was fitted on) and test:

- `eval_test.json`: sklearn `LogisticRegression` (lbfgs, C = D * K / 100 = 80.64 for 21
  classes, max_iter 1000), DinoBloom's linear probe;
- `eval_test_knn1.json`, `eval_test_knn20.json`: sklearn `KNeighborsClassifier` (k = 1, 20;
  Euclidean, uniform votes on the raw features), DinoBloom's kNN probes;
- `eval_test_weighted_knn20.json`: DINOv2's kNN (cosine, softmax(similarity / 0.07) votes), NOT
  DinoBloom's: it sits beside DINOv2's published kNN numbers, not DinoBloom's.

Comparable with the published numbers (Koch et al., MICCAI 2024, table for this dataset):
with the zenodo DinoBloom-S weights, `eval_test.json`'s accuracy / balanced_accuracy /
weighted_f1 sit beside DinoBloom-S's linear-probe row, `eval_test_knn1.json` and
`eval_test_knn20.json` beside its 1-NN and 20-NN rows: same weights, same CLS feature, same 224 px
resize and normalisation, same test images (`data.split = "dinobloom"`; README, "Protocols"),
same sklearn estimators fitted on the same non-test images. Not comparable: `--probe.c=sweep`
(DINOv2's choice of C), `model_config.pooling="cls_mean_patch"`, the weighted kNN, the
validation reports (in-sample), anything on the "stratified" split, and runs on a subset of
the images. A baseline for what the fine-tuned models must beat, at the cost of one forward pass
per image.

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
  # pooling "cls": the final-norm CLS token, DinoBloom's feature ("cls_mean_patch": DINOv2 linear).
  config.model_config = ml_collections.ConfigDict(
      {"dtype": "float32", "dropout": 0.0, "pooling": "cls"})
  # The probes: default.py's are DinoBloom's (fit on train + validation, C = D * K / 100,
  # max_iter 1000, sklearn kNN k = 1 and 20), plus DINOv2's weighted kNN under its own name.
  config.eval_batch_size = 512
  # --mode=train: a linear head on the frozen backbone.
  config.num_epochs = 10.0
  config.warmup_epochs = 1.0
  config.finetune.freeze_epochs = config.num_epochs  # the whole run
  config.learning_rate = 1e-3
  config.ema_decay = None
  return config
