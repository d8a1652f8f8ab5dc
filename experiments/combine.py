r"""Combines evaluated runs into one table: OUTPUT.md and OUTPUT.csv.

  python experiments/combine.py --output=/tmp/mnist_table \
      --workdirs=/tmp/mnist_natural,/tmp/mnist_madry,/tmp/mnist_ig_norm,\
/tmp/mnist_ig_sum_norm

Each entry is a folder holding the results.json of experiments/evaluate.py
(its --workdir, or its --output), or the path of a results.json. One row per
entry, in the given order, in the paper's layout: Dataset | Method | NA | AA |
IN | CO (NA, AA, IN in percent, CO = Kendall's tau). Prints the Markdown table.

With --figure, also OUTPUT_saliency.png: the runs' IG maps before and after
the attack on the same test images (from each run's figure_examples.npz).
"""

import argparse
import json
import os
import sys

import numpy as np
from typing import Optional, Sequence

# Make the repository importable when this file is run as a script.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rar_jax import evaluation  # pylint: disable=g-import-not-at-top,wrong-import-position


def load_results(path: str) -> dict:
  """The results.json in folder `path` (or the file `path`).

  Raises:
    FileNotFoundError: no results.json there (the message says how to make
      one).
  """
  file = path if path.endswith(".json") else os.path.join(path,
                                                          "results.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(
        f"No results in {path}: {file} does not exist. Run "
        f"experiments/evaluate.py --workdir={path} (with the run's --config) "
        "first.")
  with open(file) as f:
    return json.load(f)


def main(argv: Optional[Sequence[str]] = None) -> list[str]:
  """Parses `argv` (default: the command line), writes the table.

  Returns:
    The paths written (`OUTPUT.md`, `OUTPUT.csv`).
  """
  parser = argparse.ArgumentParser(
      description="Combines the results.json of several runs into one "
      "Markdown and CSV table.")
  parser.add_argument("--workdirs", required=True,
                      help="comma-separated folders (or results.json files)")
  parser.add_argument("--output", required=True,
                      help="path prefix of the table: writes OUTPUT.md and "
                      "OUTPUT.csv")
  parser.add_argument("--figure", action="store_true",
                      help="also write OUTPUT_saliency.png comparing the "
                      "runs' maps on the same test images")
  args = parser.parse_args(argv)
  workdirs = [w.strip() for w in args.workdirs.split(",") if w.strip()]
  if not workdirs:
    parser.error("--workdirs names no folder.")
  try:
    results = [load_results(w) for w in workdirs]
  except FileNotFoundError as err:
    sys.exit(f"combine.py: error: {err}")
  prefix = args.output
  for suffix in (".md", ".csv"):
    prefix = prefix[:-len(suffix)] if prefix.endswith(suffix) else prefix
  paths = evaluation.write_table(results, prefix)
  with open(paths[0]) as f:
    print(f.read(), end="")
  if args.figure:
    runs = []
    for workdir, result in zip(workdirs, results):
      folder = os.path.dirname(workdir) if workdir.endswith(".json") else (
          workdir)
      file = os.path.join(folder, "figure_examples.npz")
      if not os.path.isfile(file):
        sys.exit(f"combine.py: error: {file} does not exist; rerun "
                 "experiments/evaluate.py with --figures for that run.")
      with np.load(file) as data:
        runs.append((result["method"], dict(data)))
    paths.append(prefix + "_saliency.png")
    pixel_max = results[0]["config"]["objective"]["clip_max"] or 1.0
    evaluation.plot_comparison(
        runs, paths[-1], pixel_max=pixel_max,
        title=f"{results[0]['dataset']}: IG maps before and after the top-k "
        f"attack (ε = {results[0]['attack']['epsilon']:g})")
  return paths


if __name__ == "__main__":
  main()
