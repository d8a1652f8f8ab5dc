"""rar_jax: Robust Attribution Regularization (Chen et al., NeurIPS 2019) in JAX.

The library is pure functions on arrays; models come in as
`apply_fn(params, x) -> logits`.

* `rar_jax.attribution`: `integrated_gradients`, `gradient_saliency`,
  `smoothgrad`, `saliency_map`.
* `rar_jax.metrics`: `topk_intersection`, `kendall_tau`, `spearman_rho`,
  `mass_center_shift`, `accuracy`.
* `rar_jax.attacks`: `pgd` and the `attribution_attack` of Ghorbani et al.
* `rar_jax.objectives`: NATURAL, Madry, TRADES, IG-NORM, IG-SUM-NORM and the
  Wasserstein variant, by name in `OBJECTIVES`.
* `rar_jax.models` (Flax) and `rar_jax.data`: the paper's networks and data.
"""

from rar_jax import attacks
from rar_jax import attribution
from rar_jax import metrics
from rar_jax import objectives
from rar_jax.attacks import attribution_attack
from rar_jax.attacks import pgd
from rar_jax.attribution import gradient_saliency
from rar_jax.attribution import integrated_gradients
from rar_jax.attribution import saliency_map
from rar_jax.attribution import smoothgrad
from rar_jax.metrics import accuracy
from rar_jax.metrics import kendall_tau
from rar_jax.metrics import mass_center_shift
from rar_jax.metrics import spearman_rho
from rar_jax.metrics import topk_intersection
from rar_jax.objectives import OBJECTIVES

__version__ = "0.1.0"

__all__ = [
    "attacks", "attribution", "metrics", "objectives", "OBJECTIVES",
    "integrated_gradients", "gradient_saliency", "smoothgrad", "saliency_map",
    "topk_intersection", "kendall_tau", "spearman_rho", "mass_center_shift",
    "accuracy", "pgd", "attribution_attack",
]
