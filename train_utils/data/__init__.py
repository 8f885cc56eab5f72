"""Datasets: one reader per annotation format (registered in the catalog), the shared dataset
machinery, image decoding, training transforms and batch samplers.

Importing the package registers the built-in formats, in the order they are listed in ``--help``
and error messages.
"""
from train_utils.data import voc  # noqa: F401  (registers "voc")
from train_utils.data import coco  # noqa: F401  (registers "coco")
from train_utils.data import yolo  # noqa: F401  (registers "yolo")
from train_utils.data import labelme  # noqa: F401  (registers "labelme")
