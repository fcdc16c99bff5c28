"""Data built offline from packages: the cluttered-digits task used to train the reference checkpoints."""

from .cluttered_digits import DigitImages, make_cluttered_digits, split_indices

__all__ = ["DigitImages", "make_cluttered_digits", "split_indices"]
