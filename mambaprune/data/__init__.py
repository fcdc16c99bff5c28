"""Data: the cluttered-digits task built offline (it trained the reference checkpoints; per-pixel masks and
mIoU for segmentation) and folders of images."""

from .cluttered_digits import BACKGROUND, SEG_CLASSES, DigitImages, make_cluttered_digits, split_indices
from .image_folder import ImageFolder, image_folder
from .seg_metrics import class_iou, confusion_matrix, mean_iou, pixel_accuracy

__all__ = ["BACKGROUND", "SEG_CLASSES", "class_iou", "confusion_matrix", "mean_iou", "pixel_accuracy", "DigitImages", "ImageFolder", "image_folder", "make_cluttered_digits", "split_indices"]
