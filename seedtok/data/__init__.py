"""Image-text data: image loading and preprocessing (transforms); sources and collation.

* `transforms`: `load_image`, `preprocess`, `to_rgb`;
* `sources`: `Sample`, `CaptionFolder`, `WebDatasetShards`, `KarpathyCaptions`, `DataError`;
* `writer`: `write_dataset` (folder + captions.jsonl, or img2dataset-layout tar shards);
* `emoji`: `EmojiWorld`, the offline synthetic emoji image-caption world.
"""

from .emoji import EmojiWorld
from .sources import CaptionFolder, DataError, KarpathyCaptions, Sample, WebDatasetShards, open_source
from .transforms import load_image, preprocess, to_rgb
from .writer import write_dataset

__all__ = ["CaptionFolder", "DataError", "EmojiWorld", "KarpathyCaptions", "Sample", "WebDatasetShards",
           "load_image", "open_source", "preprocess", "to_rgb", "write_dataset"]
