"""The causal Q-Former (SPEC §2.2-2.3) and its stage-1 text branch.

BERT layers with 32 learned queries. Each layer: self-attention over [queries; text] -> (every
``cross_attention_every``-th layer) cross-attention of the queries to the image states -> a query-only FFN
(``intermediate_query``/``output_query``); text tokens use the ordinary BERT FFN (``intermediate``/``output``).

Parameter names follow BERT (and LAVIS), so the official ``Qformer.bert.*`` keys and a Hugging Face BERT
checkpoint both map by prefix. Hand-written rather than transformers' ``Blip2QFormerModel`` because that one
has no causal option and no text embeddings in the same module, and SEED needs both; a test checks that this
module equals ``Blip2QFormerModel`` given the same weights and SEED's mask.

Causality is an explicit flag (``causal``), not the reference's "number of queries == 32" test.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QFormerConfig


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        source = x if context is None else context
        b, n, d = x.shape
        q = self.query(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.key(source).view(b, source.shape[1], self.heads, -1).transpose(1, 2)
        v = self.value(source).view(b, source.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, n, d)


class BertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): BERT's ``*Output`` modules."""

    def __init__(self, in_width: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_width, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int, eps: float, dropout: float):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads, kv_width, dropout)
        self.output = BertResidualOutput(hidden, hidden, eps, dropout)

    def forward(self, x, context=None, mask=None):
        return self.output(self.self(x, context, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x):
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, dropout: float,
                 cross_width: int | None, text_ffn: bool):
        super().__init__()
        self.attention = BertAttention(hidden, heads, hidden, eps, dropout)
        self.crossattention = (BertAttention(hidden, heads, cross_width, eps, dropout)
                               if cross_width is not None else None)
        self.intermediate_query = BertIntermediate(hidden, intermediate)
        self.output_query = BertResidualOutput(intermediate, hidden, eps, dropout)
        if text_ffn:
            self.intermediate = BertIntermediate(hidden, intermediate)
            self.output = BertResidualOutput(intermediate, hidden, eps, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, image_states: torch.Tensor | None,
                num_queries: int) -> torch.Tensor:
        h = self.attention(x, mask=mask)
        if num_queries == 0:
            return self.output(self.intermediate(h), h)
        queries = h[:, :num_queries]
        if self.crossattention is not None:
            queries = self.crossattention(queries, context=image_states)
        out = self.output_query(self.intermediate_query(queries), queries)
        if h.shape[1] > num_queries:
            text = h[:, num_queries:]
            out = torch.cat([out, self.output(self.intermediate(text), text)], dim=1)
        return out


class QFormerEmbeddings(nn.Module):
    """LayerNorm (and dropout) over [queries; word + position embeddings of the text]. Queries get no
    position embedding; text positions start at 0."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        if cfg.text_branch:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, queries: torch.Tensor | None, input_ids: torch.Tensor | None) -> torch.Tensor:
        parts = [] if queries is None else [queries]
        if input_ids is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.dropout(self.LayerNorm(x))


def qformer_attention_mask(num_queries: int, text_mask: torch.Tensor | None, causal: bool,
                           device: torch.device | None = None) -> torch.Tensor | None:
    """Boolean self-attention mask (True = may attend), [B or 1, 1, L, L], or None when all is visible.

    SPEC §2.3: with ``causal`` the query block is lower-triangular (query i sees queries <= i); with text
    appended, everything else is visible (text keys only where ``text_mask`` is 1); text alone is bidirectional.
    """
    text_len = 0 if text_mask is None else text_mask.shape[1]
    total = num_queries + text_len
    if not causal and text_mask is None:
        return None
    allowed = torch.ones(total, total, dtype=torch.bool, device=device)
    if causal and num_queries > 0:
        allowed[:num_queries, :num_queries] = torch.ones(num_queries, num_queries, dtype=torch.bool,
                                                         device=device).tril()
    allowed = allowed[None, None]
    if text_mask is not None:
        keys = torch.cat([torch.ones(text_mask.shape[0], num_queries, dtype=torch.bool, device=device),
                          text_mask.to(device=device, dtype=torch.bool)], dim=1)
        allowed = allowed & keys[:, None, None, :]
    return allowed


class QFormer(nn.Module):
    """Learned queries + BERT layers that cross-attend to encoder states.

    Used as SEED's causal Q-Former (``causal=True``, 32 queries) and, with ``causal=False``, as SEED-1's
    77-query reverse Q-Former and as the bidirectional BLIP-2 baseline.
    """

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.hidden_size) * 0.02)
        self.embeddings = QFormerEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            QFormerLayer(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.layer_norm_eps, cfg.dropout,
                         cfg.encoder_width if i % cfg.cross_attention_every == 0 else None, cfg.text_branch)
            for i in range(cfg.num_layers))
        if cfg.text_branch:  # stage-1 contrastive head
            self.vision_proj = nn.Linear(cfg.hidden_size, cfg.contrastive_dim)
            self.text_proj = nn.Linear(cfg.hidden_size, cfg.contrastive_dim)
            self.temp = nn.Parameter(torch.tensor(cfg.initial_temperature))
        self.apply(lambda m: _init_bert(m, cfg.init_std))

    def forward(self, image_states: torch.Tensor, input_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Queries (and optional text) attending to ``image_states`` [B, N, encoder_width].
        Returns the hidden states [B, num_queries (+ text length), hidden]."""
        b = image_states.shape[0]
        queries = self.query_tokens.expand(b, -1, -1).to(image_states.dtype)
        if input_ids is not None and text_mask is None:
            text_mask = torch.ones_like(input_ids)
        mask = qformer_attention_mask(self.config.num_queries, text_mask, self.config.causal, image_states.device)
        x = self.embeddings(queries, input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask, image_states, self.config.num_queries)
        return x

    def frozen_text_keys(self) -> list[str]:
        """With ``frozen_text``: the text embeddings and text FFNs (kept as in ``init_from``)."""
        if not (self.config.frozen_text and self.config.text_branch):
            return []
        text_ffn = re.compile(r"^encoder\.layer\.\d+\.(intermediate|output)\.")
        return [k for k in self.state_dict()
                if k.startswith(("embeddings.word_embeddings.", "embeddings.position_embeddings."))
                or text_ffn.match(k)]

    @torch.no_grad()
    def init_from_bert(self, folder: str | Path, only: list[str] | None = None) -> list[str]:
        """Initialise from a Hugging Face BERT checkpoint the way BLIP-2 does from BERT-base: self-attention,
        text FFNs and embeddings copied; query FFNs copied from the text FFNs; cross-attention stays random.
        BERT's token-type embedding 0 (added to every token) is folded into the position embeddings, since
        the Q-Former has no token types. Returns the keys that were not initialised from BERT."""
        from safetensors.torch import load_file

        bert = load_file(str(Path(folder) / "model.safetensors"))
        bert = {k.removeprefix("bert."): v for k, v in bert.items()}
        if "embeddings.token_type_embeddings.weight" in bert and "embeddings.position_embeddings.weight" in bert:
            bert["embeddings.position_embeddings.weight"] = (bert["embeddings.position_embeddings.weight"]
                                                             + bert["embeddings.token_type_embeddings.weight"][0])
        own = self.state_dict()
        if only is not None:
            own = {k: own[k] for k in only}
        filled = set()
        for key, target in own.items():
            source = key.replace("intermediate_query.", "intermediate.").replace("output_query.", "output.")
            if source in bert:
                value = bert[source]
                if key == "embeddings.word_embeddings.weight" and value.shape[0] <= target.shape[0]:
                    target[: value.shape[0]] = value  # extra rows (e.g. [DEC]) keep their random init
                elif value.shape == target.shape:
                    target.copy_(value)
                else:
                    continue
                filled.add(key)
        return sorted(set(own) - filled)

    def encode_text(self, input_ids: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text alone (bidirectional, padding masked), through the text FFNs: [B, T, hidden]."""
        mask = None if text_mask is None else qformer_attention_mask(0, text_mask, False, input_ids.device)
        x = self.embeddings(None, input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask, None, 0)
        return x

    def image_features(self, query_states: torch.Tensor) -> torch.Tensor:
        """Contrastive image feature: ``vision_proj`` of the **last** query, L2-normalised (SPEC §3)."""
        return F.normalize(self.vision_proj(query_states[:, -1]), dim=-1)

    def text_features(self, text_states: torch.Tensor) -> torch.Tensor:
        """Contrastive text feature: ``text_proj`` of the CLS token, L2-normalised."""
        return F.normalize(self.text_proj(text_states[:, 0]), dim=-1)


def _init_bert(module: nn.Module, std: float) -> None:
    # BERT's initialisation: N(0, std) weights, zero biases, unit LayerNorm.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
