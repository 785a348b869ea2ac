import dataclasses

import pytest
import torch

from seedtok import ConfigError, SeedTokenizer, TokenizerConfig, preset
from seedtok.official import official_parameter_counts, to_official_state_dict


def _meta(config):
    with torch.device("meta"):
        return SeedTokenizer(config)


@pytest.mark.parametrize("name", ["seed2", "seed1"])
def test_paper_preset_has_exactly_the_official_keys_and_shapes(name, reference_keys):
    ours = {k: tuple(v.shape) for k, v in to_official_state_dict(_meta(preset(name))).items()}
    assert ours == reference_keys[name]


def test_seed2_parameter_counts_match_the_reference():
    counts = official_parameter_counts(_meta(preset("seed2")))
    assert counts["vision_encoder"] == 985_894_528
    assert counts["total"] - counts["vision_encoder"] == 164_104_000


def test_seed1_parameter_count_matches_the_reference():
    assert official_parameter_counts(_meta(preset("seed1")))["total"] == 1_154_069_952


def test_stage1_text_branch_matches_the_official_stage1_keys(reference_keys):
    config = preset("seed2")
    config.qformer.text_branch = True
    ours = {k: tuple(v.shape) for k, v in to_official_state_dict(_meta(config)).items()}
    stage1 = {k: v for k, v in reference_keys["stage1"].items() if not k.startswith("Qformer.cls.")}
    assert stage1.items() <= ours.items()


def test_paper_shapes_are_the_spec_numbers():
    cfg = preset("seed2")
    assert (cfg.vision.hidden_size, cfg.vision.num_layers, cfg.vision.num_heads, cfg.vision.intermediate_size) == (
        1408, 39, 16, 6144)
    assert (cfg.qformer.num_queries, cfg.qformer.hidden_size, cfg.qformer.num_layers) == (32, 768, 12)
    assert cfg.qformer.causal and cfg.qformer.layer_norm_eps == 1e-12
    assert (cfg.quantizer.codebook_size, cfg.quantizer.code_dim, cfg.quantizer.beta) == (8192, 32, 0.25)
    assert cfg.detokenizer.generation_dim == 1024
    assert preset("seed1").detokenizer.reverse_queries == 77


def test_config_json_round_trip():
    cfg = preset("micro")
    assert TokenizerConfig.from_dict(cfg.to_dict()) == cfg
    cfg2 = TokenizerConfig.from_dict({**cfg.to_dict(), "image_mean": list(cfg.image_mean)})
    assert cfg2.image_mean == cfg.image_mean


def test_bad_configs_are_config_errors():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope")
    with pytest.raises(ConfigError, match="unknown tokenizer config key"):
        TokenizerConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="QFormerConfig"):
        TokenizerConfig.from_dict({"qformer": {"widht": 3}})


def test_micro_is_deterministic_and_small():
    a, b = SeedTokenizer(preset("micro")), SeedTokenizer(preset("micro"))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a.num_tokens == 32 and a.config.qformer.causal
    assert sum(p.numel() for p in a.parameters()) < 2_000_000
    c = SeedTokenizer(dataclasses.replace(preset("micro"), seed=1))
    assert not torch.equal(a.qformer.query_tokens, c.qformer.query_tokens)


def test_shipped_run_files_load_with_their_stage():
    """Every configs/*.yaml run file parses with the loader of its stage; the tiny LM's two bundle runs keep
    tiny's recipe and differ only in the replay (first) and in what the second one changes."""
    from pathlib import Path

    from seedtok.train import load_run_config
    from seedtok.train.decoder import load_decoder_run_config
    from seedtok.train.lm import LM_RECIPES, load_lm_run_config

    folder = Path(__file__).resolve().parent.parent / "configs"
    files = sorted(folder.glob("*.yaml"))
    assert len(files) >= 7
    for path in files:
        if "-lm" in path.name:
            load_lm_run_config(str(path))
        elif "decoder" in path.name:
            load_decoder_run_config(str(path))
        else:
            load_run_config(str(path), stage=int(path.stem[-1]))
    first_model, first_train = load_lm_run_config(str(folder / "tiny-lm-first.yaml"))
    assert first_train == LM_RECIPES["tiny"] and first_model.text_replay_fraction == 0.0
    model, train = load_lm_run_config(str(folder / "tiny-lm-continue.yaml"))
    assert model.text_replay_fraction > 0 and train.lr_scales == LM_RECIPES["tiny"].lr_scales
    assert dataclasses.replace(first_model, text_replay_fraction=model.text_replay_fraction) == model
