"""Data for class-incremental runs: registered sources, the task split, loaders and device preprocessing;
and rendered fractals, a pretraining source without natural images."""

from promptcil.data.fractal import fractal_images
from promptcil.data.loader import DevicePreprocess, device_batches, make_loader, to_device_ahead
from promptcil.data.prepared import read_image_set, read_task_split
from promptcil.data.sources import SOURCES, DataError, ImageSet, load_split, register_source
from promptcil.data.tasks import TaskSplit, make_task_split, subset

__all__ = [
    "SOURCES",
    "DataError",
    "DevicePreprocess",
    "ImageSet",
    "TaskSplit",
    "fractal_images",
    "load_split",
    "device_batches",
    "make_loader",
    "to_device_ahead",
    "make_task_split",
    "read_image_set",
    "read_task_split",
    "register_source",
    "subset",
]
