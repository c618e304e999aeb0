"""captool.datasets: the synthetic scene generator, its facts, and readers of captions datasets on disk (no torch)."""

from .readers import (FORMATS, Annotations, ImageRecord, Report, coco_annotations, find_dataset, image_folder,
                      read_annotations, read_coco, read_json, read_karpathy)

__all__ = ["FORMATS", "Annotations", "ImageRecord", "Report", "coco_annotations", "find_dataset", "image_folder",
           "read_annotations", "read_coco", "read_json", "read_karpathy"]
