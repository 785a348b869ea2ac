"""Evaluation: retrieval and codebook health of the tokenizer; the emoji-world scene scorer (reconstructions,
text-to-image); reconstruction through the codes (``evaluate_decoder``)."""

from .decoder import evaluate_decoder
from .emoji_scorer import EmojiScorer
from .tokenizer import codebook_health, evaluate_tokenizer, recall_at_k

__all__ = ["EmojiScorer", "codebook_health", "evaluate_decoder", "evaluate_tokenizer", "recall_at_k"]
