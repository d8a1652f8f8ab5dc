r"""Times the original TF1 code of the paper, for the benchmark's anchors.

The issue that set rar_jax's performance targets quoted the original code
(github.com/jfc43/robust-attribution-regularization) on the same CPU: IG
attributions/s, a Madry and an IG-NORM training step and the top-k attack.
This binary times those rows again on the machine at hand, to compare with
`python -m experiments.benchmark` run side by side. It imports the
`model.py`, `pgd_attack.py` and `ig_attack.py` it finds in `--original_dir`
(a checkout of that repository, or copies cut down to the branches these
settings take) under TensorFlow 2's `tf.compat.v1` (graph mode,
`tf.Session`): none of their code is in rar_jax.

    pip install tensorflow-cpu scipy absl-py numpy
    git clone https://github.com/jfc43/robust-attribution-regularization
    python -m experiments.tf1_anchor \
        --original_dir=robust-attribution-regularization/MNIST \
        --data_npz=../shared/data/mnist_10k.npz

`--original_dir` must hold the original `model.py`, `pgd_attack.py` and
`ig_attack.py`. The workloads, with the original MNIST configs' settings:

- `ig`: the original's IG saliency (`Model(create_saliency_op="ig")`, one
  `sess.run` of `saliency` over the 100 counterfactuals of one image, as
  `ig_attack.py` evaluates it), over `--ig_images` images;
- `madry`: `LinfPGDAttack(..., 0.3, 40, 0.01, True, "xent").perturb` and
  one Adam step on `model.xent` at the adversarial batch (`train_adv.py`),
  batch 50;
- `ig_norm`: `Model("train", m=50, lamb=1, approx_factor=5)`, the attack
  with `loss_func="ar_approx"` and one Adam step on
  `loss_with_IG_regularizer` (`train_attribution.py`, "ar"), batch 50;
- `attack`: `IntegratedGradientsAttack(..., "topK", epsilon=0.3, k_top=200,
  eval_k_top=100, num_steps=100, attack_iters=--attack_steps,
  attack_times=--attack_times, alpha=0.01, attack_measure="kendall")`
  built and run per example (`eval_attribution_attack.py`), seconds per
  example over `--attack_examples` examples. As in the original, building
  the attack's ops is timed with it (also reported apart), and a step whose
  perturbation changes the label skips that step's saliency map: the record
  counts those steps (`label_changed_steps` of `steps`).

The weights are the original's initialisation (random); the attack explains
the network's own predictions (the original skips misclassified images).
Medians of `--repeats` runs after `--warmup` runs.
"""

import json
import statistics
import sys
import time

from absl import app
from absl import flags
import numpy as np

from experiments import anchor_utils

_ORIGINAL_DIR = flags.DEFINE_string(
    "original_dir", None, "The original repository's MNIST folder.",
    required=True)
_DATA_NPZ = flags.DEFINE_string(
    "data_npz", None, "npz with uint8 `images` [N, 28, 28] and `labels`; "
    "None: random uint8 digits-shaped data (timing only).")
WORKLOADS = ("ig", "madry", "ig_norm", "attack")
_WORKLOADS = flags.DEFINE_list("workloads", ["ig", "madry", "ig_norm"],
                               f"Of {', '.join(WORKLOADS)}.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per workload.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed runs first.")
_IG_IMAGES = flags.DEFINE_integer("ig_images", 16,
                                  "Images per timed IG run.")
_ATTACK_STEPS = flags.DEFINE_integer("attack_steps", 100, "Attack steps.")
_ATTACK_TIMES = flags.DEFINE_integer(
    "attack_times", 3, "Attack repeats (the original's name for what "
    "benchmark.py calls --attack_restarts; here all start at the image).")
_ATTACK_EXAMPLES = flags.DEFINE_integer("attack_examples", 1,
                                        "Examples per timed attack run.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write records here.")


def _counting(module, counts):
  """Counts `module`'s steps and those that skip the saliency map.

  `check_measure` evaluates the saliency map (`NET.saliency_flatten`) only
  when the label did not change; both are counted as they run, without
  extra session calls.
  """
  check_measure, run_model = module.check_measure, module.run_model

  def counted_check(*args, **kwargs):
    counts["steps"] += 1
    counts["label_changed_steps"] += 1   # undone if the map is evaluated
    return check_measure(*args, **kwargs)

  def counted_run(sess, operation, feed, net):
    if operation is net.saliency_flatten:
      counts["label_changed_steps"] -= 1
    return run_model(sess, operation, feed, net)

  module.check_measure, module.run_model = counted_check, counted_run


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  unknown = sorted(set(_WORKLOADS.value) - set(WORKLOADS))
  if unknown:
    raise app.UsageError(f"--workloads: unknown {', '.join(unknown)}; "
                         f"accepted: {', '.join(WORKLOADS)}.")
  # The original modules `import tensorflow as tf` and use the TF1 API.
  import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
  tf.disable_v2_behavior()
  sys.modules["tensorflow"] = tf
  sys.path.insert(0, _ORIGINAL_DIR.value)
  # pylint: disable=g-import-not-at-top,import-error
  from ig_attack import IntegratedGradientsAttack
  from model import Model
  from pgd_attack import LinfPGDAttack
  # pylint: enable=g-import-not-at-top,import-error

  np.random.seed(0)
  warmup, repeats = _WARMUP.value, _REPEATS.value
  records = []

  def record(name, rec, examples):
    rec["examples_per_s"] = examples / rec["median_s"]
    records.append(dict(name=name, **rec))
    print(f"{name:<40} median {rec['median_s']:.4g} s "
          f"[{rec['min_s']:.4g}-{rec['max_s']:.4g}]  "
          f"{rec['examples_per_s']:.4g} ex/s", flush=True)

  def session():
    sess = tf.Session()
    sess.run(tf.global_variables_initializer())
    return sess

  def fresh_model(*args, **kwargs):
    """The original `Model`, alone in a new graph."""
    tf.reset_default_graph()
    tf.set_random_seed(0)
    return Model(*args, **kwargs)

  digits = lambda n: anchor_utils.load_digits(_DATA_NPZ.value, n)

  if "ig" in _WORKLOADS.value:
    model = fresh_model(create_saliency_op="ig")
    with session() as sess:
      x, y = digits(_IG_IMAGES.value)
      reference = np.zeros((28, 28, 1), np.float32)
      alphas = np.arange(1, 101, dtype=np.float32)[:, None, None, None] / 100

      def ig():
        for image, label in zip(x, y):
          sess.run(model.saliency, feed_dict={
              model.input: alphas * image, model.label_ph: label,
              model.reference_image: reference})
      record(f"tf1 ig m=100 ({len(y)} images)",
             anchor_utils.time_runs(ig, warmup, repeats), len(y))

  for name in ("madry", "ig_norm"):
    if name not in _WORKLOADS.value:
      continue
    if name == "madry":
      model = fresh_model()
      loss, loss_func = model.xent, "xent"
    else:
      model = fresh_model("train", m=50, lamb=1.0, approx_factor=5)
      loss, loss_func = model.loss_with_IG_regularizer, "ar_approx"
    train_op = tf.train.AdamOptimizer(1e-4).minimize(loss)
    with session() as sess:
      attack = LinfPGDAttack(sess, model, 0.3, 40, 0.01, True, loss_func)
      x, y = digits(50)

      def step():
        x_adv = attack.perturb(x, y)  # pylint: disable=cell-var-from-loop
        if name == "madry":  # pylint: disable=cell-var-from-loop
          feed = {model.input: x_adv, model.label: y}
        else:
          feed = {model.input: x, model.adv_input: x_adv, model.label: y}
        sess.run(train_op, feed_dict=feed)  # pylint: disable=cell-var-from-loop
      record(f"tf1 {name} step B=50",
             anchor_utils.time_runs(step, warmup, repeats), 50)

  if "attack" in _WORKLOADS.value:
    model = fresh_model(create_saliency_op="ig")
    with session() as sess:
      x, _ = digits(_ATTACK_EXAMPLES.value)
      labels = sess.run(model.y_pred, feed_dict={model.input: x})

      counts = dict(steps=0, label_changed_steps=0)
      build_s = []

      def attack_all():
        for image, label in zip(x, labels):
          start = time.perf_counter()
          module = IntegratedGradientsAttack(
              sess=sess, test_image=image, original_label=label, NET=model,
              attack_method="topK", epsilon=0.3, k_top=200, eval_k_top=100,
              num_steps=100, attack_iters=_ATTACK_STEPS.value,
              attack_times=_ATTACK_TIMES.value, alpha=0.01,
              attack_measure="kendall",
              reference_image=np.zeros((28, 28, 1)), same_label=True)
          build_s.append(time.perf_counter() - start)
          assert module.status == 1, "the attack skipped an example"
          _counting(module, counts)
          module.iterative_attack()
      rec = anchor_utils.time_runs(attack_all, warmup, repeats)
      rec["seconds_per_example"] = rec["median_s"] / len(labels)
      rec["build_s_per_example"] = statistics.median(build_s)
      rec.update(counts)
      record(f"tf1 attack steps={_ATTACK_STEPS.value} "
             f"times={_ATTACK_TIMES.value} ({len(labels)} examples)", rec,
             len(labels))

  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(dict(tensorflow=tf.__version__, records=records), f,
                indent=1)


if __name__ == "__main__":
  app.run(main)
