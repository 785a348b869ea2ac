"""Image-text data: image loading and preprocessing (transforms); sources and collation."""

from .transforms import load_image, preprocess, to_rgb

__all__ = ["load_image", "preprocess", "to_rgb"]
