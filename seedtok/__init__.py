"""seedtok: SEED, the image tokenizer that lets a language model see and draw.

    >>> from seedtok import SeedTokenizer
    >>> tok = SeedTokenizer.from_pretrained("micro")
    >>> ids = tok.encode(["cat.png"])          # LongTensor [1, 32]
    >>> emb = tok.decode_embeddings(ids)       # generation embeddings
"""

from .config import PRESETS, TokenizerConfig, preset
from .errors import CheckpointError, ConfigError, IdsError, ImageError, SeedtokError
from .models.tokenizer import SeedTokenizer
from .models.lm import SeedLM  # stage 3: an LLM that reads and writes image ids (peft loaded lazily)

__version__ = "0.1.0"

__all__ = ["PRESETS", "CheckpointError", "ConfigError", "IdsError", "ImageError", "SeedLM", "SeedTokenizer",
           "SeedtokError", "TokenizerConfig", "preset", "__version__"]
