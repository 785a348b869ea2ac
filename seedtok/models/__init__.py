"""Model parts, one file each, in data-flow order: vision -> qformer -> quantizer -> detokenizer; the
tokenizer wires them."""

from .detokenizer import Seed1Detokenizer, Seed2Detokenizer, build_detokenizer
from .qformer import QFormer, qformer_attention_mask
from .quantizer import VectorQuantizer, vq_loss
from .tokenizer import SeedTokenizer
from .vision import EvaViT, build_vision

__all__ = ["EvaViT", "QFormer", "Seed1Detokenizer", "Seed2Detokenizer", "SeedTokenizer", "VectorQuantizer",
           "build_detokenizer", "build_vision", "qformer_attention_mask", "vq_loss"]
