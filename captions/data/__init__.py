"""Dataset adapters: each reads one source format into ``ImageRecord`` lists."""

from captions.data.coco import read_coco
from captions.data.csv_table import read_csv_table
from captions.data.flickr8k import read_flickr8k
from captions.data.karpathy import read_karpathy
from captions.data.records import SPLITS, ImageRecord, Records

FORMATS = ("coco", "flickr8k", "karpathy", "csv", "synthetic")

__all__ = ["FORMATS", "SPLITS", "ImageRecord", "Records", "read_coco", "read_csv_table", "read_flickr8k",
           "read_karpathy"]
