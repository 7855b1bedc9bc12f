"""Backdoor attacks. Importing this package registers the built-in ones in ``ATTACKS``."""

from attacks.base import ATTACKS, Attack, PoisonedSet

__all__ = ["ATTACKS", "Attack", "PoisonedSet"]
