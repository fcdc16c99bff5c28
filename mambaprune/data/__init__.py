"""Data: the cluttered-digits task built offline (it trained the reference checkpoints) and folders of images."""

from .cluttered_digits import DigitImages, make_cluttered_digits, split_indices
from .image_folder import ImageFolder, image_folder

__all__ = ["DigitImages", "ImageFolder", "image_folder", "make_cluttered_digits", "split_indices"]
