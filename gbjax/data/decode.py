"""Decoders' public face: the classes of CIFAR-10, the image file endings read, and
the error every decoder raises for corrupt data.

The decoders themselves (IDX files, CIFAR-10 python batches, image files and tar
archives; see the private ``gbjax/data/_decode.py``) are reached through
:func:`gbjax.data.load` and :func:`gbjax.data.load_image_folder`.
"""

from gbjax.data._decode import CIFAR10_CLASSES, IMAGE_EXTENSIONS, Arrays, CorruptDataError

__all__ = ["CIFAR10_CLASSES", "IMAGE_EXTENSIONS", "Arrays", "CorruptDataError"]
