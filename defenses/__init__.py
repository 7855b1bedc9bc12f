"""Backdoor defenses. Importing this package registers the built-in ones in ``DEFENSES``."""

from defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult
from defenses import anp, clp, fp, ft, fst, ibau, nad, nc, none, rnp  # noqa: F401  (registers the built-in defenses)

__all__ = ["DEFENSES", "Defense", "DefenseContext", "DefenseResult"]
