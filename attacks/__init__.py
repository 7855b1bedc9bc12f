"""Backdoor attacks. Importing this package registers the built-in ones in ``ATTACKS``."""

from attacks.base import ATTACKS, Attack, PoisonedSet
from attacks import badnets, blend, wanet  # noqa: F401  (registers the built-in attacks)
from attacks import ctrl, sig  # noqa: F401  (issue 7: clean-label SIG and CTRL)
from attacks import adaptive_blend, bpp  # noqa: F401  (issue 7: Adaptive-Blend, BppAttack)

__all__ = ["ATTACKS", "Attack", "PoisonedSet"]
