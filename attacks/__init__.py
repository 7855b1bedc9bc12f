"""Backdoor attacks. Importing this package registers the built-in ones in ``ATTACKS``."""

from attacks.base import ATTACKS, Attack, PoisonedSet
from attacks import badnets, blend, wanet  # noqa: F401  (registers the built-in attacks)

__all__ = ["ATTACKS", "Attack", "PoisonedSet"]
