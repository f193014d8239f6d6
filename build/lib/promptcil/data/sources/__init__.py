"""Image sources, one module each (registered with `SOURCES`); base.py holds what they share."""

from promptcil.data.sources.base import (
    DEBIAN_FASHION_MNIST,
    DEFAULT_ROOT,
    SOURCES,
    DataError,
    ImageSet,
    class_image_files,
    decompress_atomically,
    load_split,
    read_rgb_image,
    register_source,
)

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "DEFAULT_ROOT",
    "SOURCES",
    "DataError",
    "ImageSet",
    "class_image_files",
    "decompress_atomically",
    "load_split",
    "read_rgb_image",
    "register_source",
]
