"""Placeholder: filled in by the author of this defense."""
