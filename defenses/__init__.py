"""Backdoor defenses. Importing this package registers the built-in ones in ``DEFENSES``."""

from defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult

__all__ = ["DEFENSES", "Defense", "DefenseContext", "DefenseResult"]
