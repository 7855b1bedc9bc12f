"""Backdoor attacks. Importing this package registers the built-in ones in ``ATTACKS``."""

from attacks.base import ATTACKS, Attack, PoisonedSet
from attacks import badnets, blend, wanet  # noqa: F401  (registers the built-in attacks)
from attacks import ctrl, sig  # noqa: F401  (clean-label SIG and CTRL)
from attacks import adaptive_blend, bpp  # noqa: F401  (Adaptive-Blend, BppAttack)
from attacks import clean, lf  # noqa: F401  (the clean model, low-frequency UAP)
from attacks import iad  # noqa: F401  (Input-Aware Dynamic)
from attacks import lc, trojan  # noqa: F401  (label-consistent, TrojanNN)
from attacks import awp, lira  # noqa: F401  (adversarial weight perturbation, LIRA)
from attacks import dfst, fc  # noqa: F401  (DFST, Feature Collision)

__all__ = ["ATTACKS", "Attack", "PoisonedSet"]
