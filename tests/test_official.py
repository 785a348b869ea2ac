"""Official checkpoints at reduced widths: files with the official names and layouts, built from a micro model."""

import pickle

import pytest
import torch

from seedtok import CheckpointError, SeedTokenizer, preset
from seedtok.cli import main
from seedtok.official import infer_version, official_key_map, to_official_state_dict


def _official_files(model, tmp_path, version):
    """Write the files the official code ships: (seed2) seed_quantizer.pt + eva_vit_g.pth, or (seed1)
    eva_vit_g.pth + causal_qformer.pth + seed_tokenizer.pth in LAVIS {'model': ...} form."""
    state = {k: v.clone() for k, v in to_official_state_dict(model).items()}
    vit = {k[len("visual_encoder."):]: state.pop(k) for k in list(state) if k.startswith("visual_encoder.")}
    # eva_vit_g.pth holds a 40th block that SEED drops
    extra_block = len(model.vision.model.encoder.layers)
    for k in [k for k in vit if k.startswith("blocks.0.")]:
        vit[k.replace("blocks.0.", f"blocks.{extra_block}.")] = torch.randn_like(vit[k])
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    if version == "seed2":
        # training leftovers the released file carries (unexpected keys)
        state["Qformer.cls.predictions.bias"] = torch.zeros(7)
        state["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(3, 3)
        state["Qformer.bert.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(3, 3)
        torch.save(state, tmp_path / "seed_quantizer.pt")
        return [tmp_path / "seed_quantizer.pt", tmp_path / "eva_vit_g.pth"]
    stage1 = {k: state.pop(k) for k in list(state) if k.startswith(("Qformer.", "query_tokens", "ln_vision"))}
    torch.save({"model": stage1, "epoch": 9}, tmp_path / "causal_qformer.pth")
    torch.save({"model": state}, tmp_path / "seed_tokenizer.pth")
    return [tmp_path / "eva_vit_g.pth", tmp_path / "causal_qformer.pth", tmp_path / "seed_tokenizer.pth"]


def _micro_paper_layout(name):
    config = preset(name)
    config.qformer.text_branch = False  # as released: no text branch
    config.seed = 7
    return config


@pytest.mark.parametrize("name, version", [("micro", "seed2"), ("micro-seed1", "seed1")])
def test_official_files_load_exactly(name, version, tmp_path, photos):
    source = SeedTokenizer(_micro_paper_layout(name)).eval()
    paths = _official_files(source, tmp_path, version)
    config = _micro_paper_layout(name)
    config.seed = 0  # different random init: everything must come from the files
    loaded = SeedTokenizer.from_official(*paths, config=config)
    report = loaded.load_report
    assert report.version == version
    assert report.missing == {}
    expected_loaded = len(official_key_map(source))
    assert report.loaded == expected_loaded
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(loaded.encode(photos), source.encode(photos))
    ids = source.encode(photos[:3])
    assert torch.equal(loaded.decode_embeddings(ids), source.decode_embeddings(ids))
    assert any("blocks.*." in pattern for pattern in report.unexpected)  # the 40th block, summarised
    if version == "seed2":
        assert report.unexpected["Qformer.bert.encoder.layer.*.intermediate.dense.weight"] == 2
        assert "Qformer.cls.predictions.bias" in report.unexpected
    text = report.summary()
    assert "missing 0 keys" in text and f"loaded {expected_loaded}" in text


def test_missing_vit_is_reported_by_part_and_fatal_when_strict(tmp_path):
    source = SeedTokenizer(_micro_paper_layout("micro"))
    paths = _official_files(source, tmp_path, "seed2")
    with pytest.raises(CheckpointError, match="eva_vit_g.pth"):
        SeedTokenizer.from_official(paths[0], config=_micro_paper_layout("micro"))
    loose = SeedTokenizer.from_official(paths[0], config=_micro_paper_layout("micro"), strict=False)
    vit_keys = [k for k in to_official_state_dict(source) if k.startswith("visual_encoder.")]
    assert sorted(loose.load_report.missing) == ["vision"]
    assert sorted(loose.load_report.missing["vision"]) == sorted(vit_keys)


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    state = to_official_state_dict(SeedTokenizer(_micro_paper_layout("micro")))
    state["quantize.embedding.weight"] = torch.zeros(65, 8)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"quantize\.embedding\.weight.*\(65, 8\).*\(64, 8\)"):
        SeedTokenizer.from_official(tmp_path / "bad.pt", config=_micro_paper_layout("micro"))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_with_code_are_refused(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": {"x": Evil()}}, f)
    with pytest.raises(CheckpointError, match="refusing"):
        SeedTokenizer.from_official(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError):
        SeedTokenizer.from_official(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not found"):
        SeedTokenizer.from_official(tmp_path / "nope.pt")


def test_version_is_inferred_from_the_keys():
    assert infer_version(["reverse_tokens", "query_tokens"]) == "seed1"
    assert infer_version(["image_down.0.weight", "query_tokens"]) == "seed2"


def test_official_vit_key_map_is_the_spec_map():
    from seedtok.official import official_name

    assert official_name("vision.model.embeddings.class_embedding") == ["visual_encoder.cls_token"]
    assert official_name("vision.model.encoder.layers.3.self_attn.qkv.bias") == [
        "visual_encoder.blocks.3.attn.q_bias", "visual_encoder.blocks.3.attn.v_bias"]
    assert official_name("vision.model.encoder.layers.3.self_attn.projection.weight") == [
        "visual_encoder.blocks.3.attn.proj.weight"]
    assert official_name("vision.ln_vision.weight") == ["ln_vision.weight"]
    assert official_name("qformer.encoder.layer.2.crossattention.self.key.weight") == [
        "Qformer.bert.encoder.layer.2.crossattention.self.key.weight"]
    assert official_name("detokenizer.reverse_qformer.query_tokens") == ["reverse_tokens"]


def test_k_bias_of_eva_is_zero_after_loading(tmp_path):
    source = SeedTokenizer(_micro_paper_layout("micro"))
    with torch.no_grad():
        for layer in source.vision.model.encoder.layers:
            layer.self_attn.qkv.bias.normal_()
    paths = _official_files(source, tmp_path, "seed2")
    loaded = SeedTokenizer.from_official(*paths, config=_micro_paper_layout("micro"))
    bias = loaded.vision.model.encoder.layers[0].self_attn.qkv.bias
    d = bias.shape[0] // 3
    assert torch.count_nonzero(bias[d:2 * d]) == 0
    torch.testing.assert_close(bias[:d], source.vision.model.encoder.layers[0].self_attn.qkv.bias[:d])


def test_cli_convert_official_writes_a_loadable_folder(tmp_path, capsys):
    config = _micro_paper_layout("micro")
    source = SeedTokenizer(config)
    paths = _official_files(source, tmp_path, "seed2")
    (tmp_path / "micro.json").write_text(config.to_json())
    assert main(["convert", "official", *map(str, paths), "--out", str(tmp_path / "out"),
                 "--config", str(tmp_path / "micro.json")]) == 0
    captured = capsys.readouterr()
    assert "missing 0 keys" in captured.err and "saved" in captured.out
    loaded = SeedTokenizer.from_pretrained(tmp_path / "out")
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_cli_convert_official_errors_in_one_line(tmp_path, capsys):
    torch.save(to_official_state_dict(SeedTokenizer(preset("micro"))), tmp_path / "all_in_one.pt")
    # the paper preset (default) does not fit micro-sized weights: a one-line error, nothing written
    assert main(["convert", "official", str(tmp_path / "all_in_one.pt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seedtok: error: shape mismatch") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
