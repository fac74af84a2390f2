"""egat: Explanation-Guided Adversarial Training (reference implementation)."""

__version__ = "0.1.0"
