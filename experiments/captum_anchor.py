r"""Times PyTorch + Captum on the benchmark's IG and PGD rows, as an anchor.

The issue that set rar_jax's performance targets compared it with PyTorch +
Captum on the same CPU. This binary measures those two rows again, on the
machine at hand, so that they can be compared with
`python -m experiments.benchmark` run side by side:

- IG of the label logit on the paper's MNIST CNN, 100 right-Riemann points
  from a black baseline, batch 64 (`captum.attr.IntegratedGradients`, for
  each `--ig_internal_batch_sizes`: the images per forward/backward pass,
  0 meaning all 6,400 at once);
- L-inf PGD on the cross-entropy, 40 steps, epsilon 0.3, step 0.01, random
  start, batch 50 (`captum.robust.PGD`);
- the float32 matmul peak (2048 x 2048 `torch.mm`), for the % of peak.

It is not part of rar_jax and needs what rar_jax does not install:

    pip install torch captum absl-py numpy
    python -m experiments.captum_anchor --data_npz=../shared/data/mnist_10k.npz

The model is the paper's MNIST CNN (conv 5x5x32, max-pool, conv 5x5x64,
max-pool, fc 1024, fc 10; ReLU) in PyTorch's NCHW layout, initialised as
rar_jax's `MnistCNN` (truncated normal 0.1, biases 0.1). Timings are medians
of `--repeats` runs after `--warmup` runs, with torch's default threads (the
output and the JSON record how many).
"""

import functools
import json
import os

from absl import app
from absl import flags
import numpy as np
import torch
from torch import nn

from experiments import anchor_utils

_DATA_NPZ = flags.DEFINE_string(
    "data_npz", None, "npz with uint8 `images` [N, 28, 28] and `labels`; "
    "None: random uint8 digits-shaped data (timing only).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per workload.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed runs first.")
_IG_BATCH = flags.DEFINE_integer("ig_batch", 64, "Images per IG call.")
_IG_STEPS = flags.DEFINE_integer("ig_steps", 100, "IG points.")
_IG_INTERNAL_BATCH_SIZES = flags.DEFINE_list(
    "ig_internal_batch_sizes", ["0", "64"],
    "Captum's internal_batch_size values to time (0: all points at once).")
_PGD_BATCH = flags.DEFINE_integer("pgd_batch", 50, "Images per PGD call.")
_PGD_STEPS = flags.DEFINE_integer("pgd_steps", 40, "PGD steps.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write records here.")


class MnistCNN(nn.Module):
  """The paper's MNIST CNN in NCHW."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
    self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
    self.fc1 = nn.Linear(7 * 7 * 64, 1024)
    self.fc2 = nn.Linear(1024, 10)
    for layer in (self.conv1, self.conv2, self.fc1, self.fc2):
      nn.init.trunc_normal_(layer.weight, std=0.1, a=-0.2, b=0.2)
      nn.init.constant_(layer.bias, 0.1)

  def forward(self, x):
    x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
    x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
    x = torch.relu(self.fc1(x.flatten(1)))
    return self.fc2(x)


def _torch_digits(n):
  """`anchor_utils.load_digits` as NCHW torch tensors."""
  x, y = anchor_utils.load_digits(_DATA_NPZ.value, n)
  return (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
          torch.from_numpy(y))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  bad = [v for v in _IG_INTERNAL_BATCH_SIZES.value
         if not v.isdigit()]
  if bad:
    raise app.UsageError(f"--ig_internal_batch_sizes: {', '.join(bad)} not "
                         "accepted; integers >= 0 (0: all points at once).")
  # Imported here so that `--help` works without Captum.
  # pylint: disable=g-import-not-at-top
  import captum
  from captum.attr import IntegratedGradients
  from captum.robust import PGD
  # pylint: enable=g-import-not-at-top

  torch.manual_seed(0)
  model = MnistCNN().eval()
  for p in model.parameters():
    p.requires_grad_(False)
  warmup, repeats = _WARMUP.value, _REPEATS.value
  records = []

  a = torch.randn(2048, 2048)
  peak = anchor_utils.time_runs(lambda: torch.mm(a, a), 2, 10)
  peak["flops_per_s"] = 2 * 2048 ** 3 / peak["median_s"]
  records.append(dict(name="matmul_peak n=2048", **peak))

  x, y = _torch_digits(_IG_BATCH.value)
  ig = IntegratedGradients(model)
  for size in _IG_INTERNAL_BATCH_SIZES.value:
    attribute = functools.partial(
        ig.attribute, x, baselines=0.0, target=y, n_steps=_IG_STEPS.value,
        method="riemann_right", internal_batch_size=int(size) or None)
    rec = anchor_utils.time_runs(attribute, warmup, repeats)
    internal = attribute.keywords["internal_batch_size"]
    rec["examples_per_s"] = _IG_BATCH.value / rec["median_s"]
    records.append(dict(name=f"captum ig B={_IG_BATCH.value} "
                        f"m={_IG_STEPS.value} internal={internal}", **rec))

  x, y = _torch_digits(_PGD_BATCH.value)
  pgd = PGD(model, nn.CrossEntropyLoss(reduction="none"),
            lower_bound=0.0, upper_bound=1.0)
  rec = anchor_utils.time_runs(lambda: pgd.perturb(
      x, radius=0.3, step_size=0.01, step_num=_PGD_STEPS.value, target=y,
      norm="Linf", random_start=True), warmup, repeats)
  rec["examples_per_s"] = _PGD_BATCH.value / rec["median_s"]
  records.append(dict(name=f"captum pgd B={_PGD_BATCH.value} "
                      f"steps={_PGD_STEPS.value}", **rec))

  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"matmul peak {peak['flops_per_s'] / 1e9:.1f} GFLOP/s")
  for rec in records:
    rate = rec.get("examples_per_s")
    print(f"{rec['name']:<40} median {rec['median_s']:.4g} s "
          f"[{rec['min_s']:.4g}-{rec['max_s']:.4g}]"
          + (f"  {rate:.2f} ex/s" if rate else ""))
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(dict(torch=torch.__version__, captum=captum.__version__,
                     torch_threads=torch.get_num_threads(),
                     cpu_count=os.cpu_count(), records=records), f, indent=1)


if __name__ == "__main__":
  app.run(main)
