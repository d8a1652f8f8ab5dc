r"""The paper's gtsrb presets: `--config=experiments/configs/gtsrb.py:METHOD[,smoke]`.

METHOD is natural, madry, ig_norm or ig_sum_norm; the values are in paper.py.
"""

from experiments.configs import paper


def get_config(arg: str = "ig_norm"):
  return paper.get_config("gtsrb," + arg)
