"""PyTorch's training step for the models of bench/train_step.py, on the same card: images/s.

  python bench/torch_reference.py --model resnet50              # torchvision, AMP bf16, NHWC
  python bench/torch_reference.py --model vit_base_patch14      # timm vit_base_patch14_dinov2
  python bench/torch_reference.py --model resnet50 --device cpu --batch 4 --image_size 64 \\
      --steps 2 --warmup 1 --compile off                         # a CPU smoke run

The reference bmcc's steps are compared with (bench/gpu.sh runs both). The step does what bmcc's
does for configs/resnet50.py and configs/dinobloom_b_finetune.py: a device-resident random uint8
NHWC batch normalised on the device, forward and backward under `torch.autocast` in bfloat16
(parameters float32), cross-entropy with label smoothing 0.1, global-norm gradient clipping at
1.0, AdamW (fused on CUDA; weight decay 0.05 on weights of 2+ dimensions only), and an EMA of the
parameters and float buffers (`torch._foreach_lerp_`, decay 0.999). Not done: bmcc's learning-rate
schedule and ViT layer-wise decay (scalar work per step, no effect on speed worth timing).

Models: torchvision `resnet50` in channels-last memory format (the uint8 NHWC batch permuted to
NCHW is already channels-last), `torch.backends.cudnn.benchmark` on; timm
`vit_base_patch14_dinov2` at `img_size` 224 (12 blocks, width 768, 12 heads, LayerScale, 257
tokens, the same shapes as bmcc's ViT-B/14), drop path 0.1, attention through
`F.scaled_dot_product_attention` (timm's fused attention: flash or cuDNN kernels on a GPU).

Eager first, then `torch.compile(model)` (default mode) unless `--compile off`: its compilation
(the warm-up steps) runs under a `--compile_timeout` alarm, so a slow compile reports 'timed out'
and the eager figure stands. If a batch does not fit, it is halved until it does. Key lines, as
bench/train_step.py prints them: `eager_images_per_second=`, `compiled_images_per_second=`,
`forward_images_per_second=` (eager, eval mode, inference), `peak_memory_gib=`; the LAST line is
`images_per_second=<float>`, the better of eager and compiled. Imports torch (and torchvision or
timm) only.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

MODELS = ("resnet50", "vit_base_patch14", "vit_small_patch14", "vit_giant_patch14")
TIMM_NAMES = {"vit_base_patch14": "vit_base_patch14_dinov2",
              "vit_small_patch14": "vit_small_patch14_dinov2",
              "vit_giant_patch14": "vit_giant_patch14_dinov2"}
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def build_model(name: str, image_size: int, num_classes: int):
  """The torch model for bmcc's `name`, random weights, train mode."""
  if name == "resnet50":
    import torchvision

    return torchvision.models.resnet50(num_classes=num_classes)
  import timm

  return timm.create_model(TIMM_NAMES[name], pretrained=False, img_size=image_size,
                           num_classes=num_classes, drop_path_rate=0.1)


class Step:
  """One training step (forward, backward, clip, AdamW, EMA) of a model on a uint8 NHWC batch."""

  def __init__(self, model, device: str, dtype, channels_last: bool):
    import torch

    self.torch = torch
    self.model = model
    self.device = device
    self.dtype = dtype
    self.channels_last = channels_last
    self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    self.params = params
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.05},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    self.optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=device == "cuda")
    self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    self.live = params + [b for b in model.buffers() if b.is_floating_point()]
    self.ema = [t.detach().clone() for t in self.live]

  def __call__(self, forward, images, labels):
    torch = self.torch
    x = images.permute(0, 3, 1, 2).float()  # NHWC uint8 -> NCHW view: channels-last strides
    x = (x - self.mean) / self.std
    if self.channels_last:
      x = x.contiguous(memory_format=torch.channels_last)
    else:
      x = x.contiguous()
    with torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype != torch.float32):
      logits = forward(x)
    loss = self.criterion(logits.float(), labels)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
    self.optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, [t.detach() for t in self.live], 1 - 0.999)
    return loss


def _sync(torch, device: str) -> None:
  if device == "cuda":
    torch.cuda.synchronize()


class _Alarm(Exception):
  pass


def _time_steps(torch, step, forward, images, labels, device, warmup, steps, timeout=None):
  """(warm-up seconds, mean seconds per timed step, last loss); the warm-up under `timeout`."""
  def on_alarm(signum, frame):
    raise _Alarm()

  start = time.perf_counter()
  if timeout:
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(timeout))
  try:
    for _ in range(warmup):
      loss = step(forward, images, labels)
    _sync(torch, device)
  finally:
    if timeout:
      signal.alarm(0)
      signal.signal(signal.SIGALRM, previous)
  warm = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    loss = step(forward, images, labels)
  _sync(torch, device)
  return warm, (time.perf_counter() - start) / steps, float(loss.detach())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=MODELS, default="resnet50")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--num_classes", type=int, default=21)
  parser.add_argument("--steps", type=int, default=30, help="timed steps")
  parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
  parser.add_argument("--forward_steps", type=int, default=10, help="timed eval forward passes")
  parser.add_argument("--compile", choices=("on", "off"), default="on")
  parser.add_argument("--compile_timeout", type=float, default=150.0,
                      help="seconds for torch.compile's warm-up steps before giving up")
  parser.add_argument("--device", default=None, help="cuda (default where present) or cpu")
  parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  args = parser.parse_args()

  import torch

  device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
  name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
  print(f"device={name} ({device}) torch={torch.__version__}", flush=True)
  torch.backends.cudnn.benchmark = True
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  dtype = getattr(torch, args.dtype)
  channels_last = args.model == "resnet50"
  torch.manual_seed(0)
  start = time.perf_counter()
  model = build_model(args.model, args.image_size, args.num_classes).to(device)
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  model.train()
  num_params = sum(p.numel() for p in model.parameters())
  print(f"model={args.model} ({type(model).__name__}) parameters={num_params:,} "
        f"image_size={args.image_size} dtype={args.dtype} channels_last={channels_last} "
        f"(built in {time.perf_counter() - start:.1f} s)", flush=True)
  step = Step(model, device, dtype, channels_last)

  batch = args.batch
  results = {}
  while True:
    try:
      generator = torch.Generator(device=device).manual_seed(0)
      images = torch.randint(0, 256, (batch, args.image_size, args.image_size, 3),
                             dtype=torch.uint8, device=device, generator=generator)
      labels = torch.randint(0, args.num_classes, (batch,), device=device, generator=generator)
      if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
      warm, seconds, loss = _time_steps(torch, step, model, images, labels, device,
                                        args.warmup, args.steps)
      break
    except torch.OutOfMemoryError:
      if batch <= 1:
        raise
      batch //= 2
      step.optimizer.zero_grad(set_to_none=True)
      torch.cuda.empty_cache()
      print(f"out of memory: batch halved to {batch}", flush=True)
  print(f"batch={batch}")
  results["eager"] = batch / seconds
  print(f"eager_warmup_seconds={warm:.2f} ({args.warmup} steps)")
  print(f"eager_step_seconds={seconds:.4f} (mean of {args.steps} timed steps; "
        f"last loss {loss:.3f})")
  if device == "cuda":
    print(f"peak_memory_gib={torch.cuda.max_memory_allocated() / 2**30:.3f} (eager training, "
          "torch.cuda.max_memory_allocated)")
  print(f"eager_images_per_second={results['eager']:.1f}", flush=True)

  if args.forward_steps > 0:
    model.eval()
    with torch.inference_mode(), torch.autocast(device, dtype=dtype,
                                                enabled=dtype != torch.float32):
      x = ((images.permute(0, 3, 1, 2).float() - step.mean) / step.std)
      x = x.contiguous(memory_format=torch.channels_last if channels_last else
                       torch.contiguous_format)
      model(x)
      _sync(torch, device)
      start = time.perf_counter()
      for _ in range(args.forward_steps):
        model(x)
      _sync(torch, device)
      forward = args.forward_steps * batch / (time.perf_counter() - start)
    model.train()
    del x
    print(f"forward_images_per_second={forward:.1f} (eager, eval mode, inference, logits)",
          flush=True)

  if args.compile == "on":
    try:
      start = time.perf_counter()
      compiled = torch.compile(model)
      warm, seconds, loss = _time_steps(torch, step, compiled, images, labels, device,
                                        args.warmup, args.steps, timeout=args.compile_timeout)
      results["compiled"] = batch / seconds
      print(f"compile_seconds={warm:.1f} (torch.compile + {args.warmup} warm-up steps)")
      print(f"compiled_step_seconds={seconds:.4f} (mean of {args.steps} timed steps; last loss "
            f"{loss:.3f})")
      print(f"compiled_images_per_second={results['compiled']:.1f}", flush=True)
    except _Alarm:
      print(f"compiled_images_per_second=n/a (torch.compile timed out after "
            f"{args.compile_timeout:.0f} s; eager stands)", flush=True)
    except Exception as e:  # noqa: BLE001  (any compile failure: eager stands)
      if "_Alarm" in repr(e) or time.perf_counter() - start >= args.compile_timeout:
        # The alarm went off inside dynamo, which wrapped it.
        print(f"compiled_images_per_second=n/a (torch.compile timed out after "
              f"{args.compile_timeout:.0f} s; eager stands)", flush=True)
        return _finish(results, batch)
      message = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
      print(f"compiled_images_per_second=n/a (torch.compile failed: {type(e).__name__}: "
            f"{message})", flush=True)
  _finish(results, batch)


def _finish(results: dict, batch: int) -> None:
  """Prints the better of eager and compiled last, and exits at once."""
  best = max(results, key=results.get)
  print(f"step_seconds={batch / results[best]:.4f} ({best})")
  print(f"images_per_second={results[best]:.1f} ({best})", flush=True)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # skip the compile workers' clean-up, which can hang after an alarm


if __name__ == "__main__":
  main()
