import dataclasses

import pytest
import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from seedtok.config import QFormerConfig
from seedtok.models.qformer import QFormer, qformer_attention_mask

CFG = QFormerConfig(hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64, encoder_width=48,
                    text_branch=True, vocab_size=100, max_position_embeddings=40, init_std=0.3, dropout=0.0)


def _model(**changes):
    torch.manual_seed(0)
    return QFormer(dataclasses.replace(CFG, **changes)).eval()


def _states(batch=2, n=10, seed=1):
    return torch.randn(batch, n, CFG.encoder_width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("j", [0, 5, 17, 31])
def test_causal_queries_see_only_earlier_queries(j):
    model, states = _model(), _states()
    base = model(states)
    with torch.no_grad():
        model.query_tokens[:, j] += 1.0
    moved = model(states)
    assert torch.equal(base[:, :j], moved[:, :j]), "an earlier query saw a later one"
    assert ((base[:, j:] - moved[:, j:]).abs().amax(dim=-1) > 0).all(), "query i >= j must depend on query j"


def test_bidirectional_option_is_not_causal():
    model, states = _model(causal=False), _states()
    base = model(states)
    with torch.no_grad():
        model.query_tokens[:, 20] += 1.0
    assert not torch.allclose(base[:, :20], model(states)[:, :20])


def test_every_query_reads_the_image():
    model = _model()
    a, b = model(_states(seed=1)), model(_states(seed=2))
    assert (a - b).abs().amax(dim=-1).min() > 1e-4


def _to_blip2(model: QFormer, causal_config: QFormerConfig) -> Blip2QFormerModel:
    """transformers' BLIP-2 Q-Former with our weights, through the SPEC's key map."""
    cfg = causal_config
    hf = Blip2QFormerModel(Blip2QFormerConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size, hidden_act="gelu",
        layer_norm_eps=cfg.layer_norm_eps, cross_attention_frequency=cfg.cross_attention_every,
        encoder_hidden_size=cfg.encoder_width, use_qformer_text_input=False,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    state = {}
    for key, value in model.state_dict().items():
        if key == "query_tokens":
            continue
        key = (key.replace(".attention.self.", ".attention.attention.")
               .replace(".crossattention.self.", ".crossattention.attention.")
               .replace("embeddings.LayerNorm", "layernorm"))
        state[key] = value
    hf.load_state_dict(state, strict=True)
    return hf


@pytest.mark.parametrize("causal", [True, False])
def test_equals_transformers_blip2_qformer_with_seeds_mask(causal):
    """SPEC §2.3: BLIP-2's Q-Former + a lower-triangular 4-D mask is SEED's causal Q-Former."""
    cfg = dataclasses.replace(CFG, text_branch=False, causal=causal)
    torch.manual_seed(0)
    model = QFormer(cfg).eval()
    hf = _to_blip2(model, cfg)
    states = _states(batch=3)
    queries = model.query_tokens.expand(3, -1, -1)
    mask = torch.ones(3, 1, 32, 32).tril().bool() if causal else None
    with torch.no_grad():
        theirs = hf(query_embeds=queries, encoder_hidden_states=states, attention_mask=mask).last_hidden_state
        ours = model(states)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_mask_with_text_is_causal_only_inside_the_query_block():
    text_mask = torch.tensor([[1, 1, 1, 0]])
    mask = qformer_attention_mask(3, text_mask, causal=True)[0, 0].int()
    expected = torch.tensor([
        [1, 0, 0, 1, 1, 1, 0],
        [1, 1, 0, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 0],
    ])
    assert torch.equal(mask, expected)
    assert qformer_attention_mask(3, None, causal=False) is None


def test_text_padding_is_invisible_and_text_alone_is_bidirectional():
    model = _model()
    ids = torch.tensor([[5, 6, 7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    a = model.encode_text(ids, mask)
    b = model.encode_text(torch.tensor([[5, 6, 7, 8, 9, 42]]), mask)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    c = model.encode_text(torch.tensor([[5, 6, 7, 9, 0, 0]]), mask)
    assert not torch.allclose(a[:, 0], c[:, 0]), "CLS must see later tokens (bidirectional)"


def test_queries_with_text_use_query_ffn_and_text_uses_text_ffn():
    model, states = _model(), _states(batch=1)
    ids = torch.tensor([[5, 6, 7]])
    joint = model(states, ids)
    assert joint.shape == (1, 35, 32)
    with torch.no_grad():  # the last layer's text FFN acts on text positions only
        model.encoder.layer[-1].output.dense.weight.mul_(2)
    changed = model(states, ids)
    assert torch.equal(joint[:, :32], changed[:, :32])
    assert not torch.allclose(joint[:, 32:], changed[:, 32:])
    with torch.no_grad():  # ... and its query FFN on query positions only
        model.encoder.layer[-1].output_query.dense.weight.mul_(2)
    changed2 = model(states, ids)
    assert torch.equal(changed[:, 32:], changed2[:, 32:])
    assert not torch.allclose(changed[:, :32], changed2[:, :32])


def test_contrastive_features_use_last_query_and_cls():
    model, states = _model(), _states()
    q = model(states)
    img = model.image_features(q)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2))
    q2 = q.clone()
    q2[:, :-1] = 0
    torch.testing.assert_close(model.image_features(q2), img)
    assert model.temp.item() == pytest.approx(0.07)
