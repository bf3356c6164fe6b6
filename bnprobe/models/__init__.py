"""Architectures: All-CNN-C and torchvision models."""

from .allcnn import AllCNN
from .registry import build_model, default_arch_kwargs

__all__ = ["AllCNN", "build_model", "default_arch_kwargs"]
