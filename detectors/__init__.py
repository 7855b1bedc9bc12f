"""Backdoor detectors. Importing this package registers the built-in ones in ``DETECTORS``."""

from detectors.base import DETECTORS, Detection, Detector
from detectors import ac, nc_label, rnp_label, rnp_samples, rnp_trigger, spectral, strip  # noqa: F401  (registers the built-in detectors)

__all__ = ["DETECTORS", "Detection", "Detector"]
