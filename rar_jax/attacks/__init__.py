"""Attacks: PGD (the inner maximiser of every objective) and attribution attacks.

* `pgd`: projected gradient ascent on any per-example objective.
* `attribution_attack`: the top-k / mass-centre / targeted / random
  attribution attacks of Ghorbani et al., batched over examples and restarts.
"""

from rar_jax.attacks.attribution_attack import ATTACKS
from rar_jax.attacks.attribution_attack import attack_chunk_size
from rar_jax.attacks.attribution_attack import attack_chunking
from rar_jax.attacks.attribution_attack import CPU_IMAGES_AT_ONCE
from rar_jax.attacks.attribution_attack import attribution_attack
from rar_jax.attacks.attribution_attack import SALIENCIES
from rar_jax.attacks.attribution_attack import saliency_fn
from rar_jax.attacks.pgd_attack import NORMS
from rar_jax.attacks.pgd_attack import pgd
from rar_jax.attacks.pgd_attack import project
from rar_jax.attacks.pgd_attack import random_start

__all__ = [
    "ATTACKS", "SALIENCIES", "NORMS", "CPU_IMAGES_AT_ONCE", "attack_chunk_size",
    "attack_chunking",
    "attribution_attack", "saliency_fn",
    "pgd", "project", "random_start",
]
