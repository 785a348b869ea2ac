"""seedtok: SEED, the image tokenizer that lets a language model see and draw.

    >>> from seedtok import SeedTokenizer
    >>> tok = SeedTokenizer.from_pretrained("micro")
    >>> ids = tok.encode(["cat.png"])          # LongTensor [1, 32]
    >>> emb = tok.decode_embeddings(ids)       # generation embeddings
"""

from .config import PRESETS, TokenizerConfig, preset
from .errors import CheckpointError, ConfigError, IdsError, ImageError, SeedtokError
from .models.tokenizer import SeedTokenizer

__version__ = "0.1.0"

__all__ = ["PRESETS", "CheckpointError", "ConfigError", "IdsError", "ImageError", "SeedTokenizer",
           "SeedtokError", "TokenizerConfig", "preset", "__version__"]
