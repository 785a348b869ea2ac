"""Evaluation: retrieval and codebook health of the tokenizer (more stages add their own modules)."""

from .tokenizer import codebook_health, evaluate_tokenizer, recall_at_k

__all__ = ["codebook_health", "evaluate_tokenizer", "recall_at_k"]
