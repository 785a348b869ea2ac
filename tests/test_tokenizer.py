import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Blip2VisionConfig, Blip2VisionModel

from seedtok import CheckpointError, IdsError, ImageError, SeedTokenizer
from seedtok.errors import ConfigError
from seedtok.config import CLIP_MEAN, CLIP_STD


def test_ids_do_not_depend_on_batch_size(micro, photos):
    ids = [micro.encode(photos, batch_size=b) for b in (1, 4, 7)]
    assert ids[0].shape == (len(photos), 32) and ids[0].dtype == torch.long
    assert torch.equal(ids[0], ids[1]) and torch.equal(ids[0], ids[2])
    assert len({tuple(r) for r in ids[0].tolist()}) > 1, "different images must give different ids"


def test_save_load_round_trip_is_bit_exact(micro, photos, tmp_path):
    micro.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = SeedTokenizer.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == micro.config
    for (k, a), b in zip(micro.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(loaded.encode(photos), micro.encode(photos))
    ids = micro.encode(photos[:2])
    assert torch.equal(loaded.decode_embeddings(ids), micro.decode_embeddings(ids))


def test_position_rotation_survives_save_and_load(photos, tmp_path):
    # the rotations are not stored (rebuilt from the seed): a loaded model, built on the meta device and
    # filled from the file, must rebuild them, or every image collapses onto one code
    import dataclasses

    from seedtok.config import preset

    config = preset("micro")
    config = dataclasses.replace(config, quantizer=dataclasses.replace(config.quantizer, position_rotation=True))
    model = SeedTokenizer(config).eval()
    model.save_pretrained(tmp_path / "rot", dtype="fp16")
    loaded = SeedTokenizer.from_pretrained(tmp_path / "rot")
    assert torch.equal(loaded.quantizer.rotation, model.quantizer.rotation)
    model = SeedTokenizer.from_pretrained(tmp_path / "rot")  # both now hold the fp16-rounded weights
    assert torch.equal(loaded.encode(photos), model.encode(photos))
    assert len(loaded.encode(photos).unique()) > 4


MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA", "I", "F", "I;16", "LAB", "HSV", "RGBX", "La"]


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_encodes(micro, mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 20, 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode not in ("La", "PA") else rgb.convert("RGBA").convert(mode)
    assert micro.encode(image).shape == (1, 32)


@pytest.mark.parametrize("size", [(1, 1), (3000, 20), (20, 3000), (2, 2)])
def test_odd_sizes_encode(micro, size):
    image = Image.new("RGB", size, (200, 30, 90))
    assert micro.encode(image).shape == (1, 32)


def test_every_input_kind_gives_the_same_ids(micro, photos, tmp_path):
    image = photos[1]
    path = tmp_path / "coffee.png"
    image.save(path)
    array = np.array(image)
    expected = micro.encode(image)
    for variant in (path, str(path), array, torch.from_numpy(array).permute(2, 0, 1),
                    torch.from_numpy(array).permute(2, 0, 1).float() / 255.0):
        assert torch.equal(micro.encode(variant), expected), type(variant)


def test_alpha_is_dropped_by_default_and_composited_on_request(micro):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere, opaque only in the centre
    rgba[8:24, 8:24, 3] = 255
    image = Image.fromarray(rgba)
    assert torch.equal(micro.encode(image), micro.encode(image.convert("RGB")))
    on_blue = micro.preprocess([image], background=(0, 0, 255))
    expected = Image.alpha_composite(Image.new("RGBA", (32, 32), (0, 0, 255, 255)), image).convert("RGB")
    torch.testing.assert_close(on_blue, micro.preprocess([expected]))
    assert not torch.equal(on_blue, micro.preprocess([image]))


def test_preprocessing_is_bicubic_resize_and_clip_normalisation(micro):
    pixels = micro.preprocess([Image.new("RGB", (300, 100), (10, 128, 250))])
    assert pixels.shape == (1, 3, micro.config.image_size, micro.config.image_size)
    for c, value in enumerate((10, 128, 250)):
        torch.testing.assert_close(pixels[0, c], torch.full_like(pixels[0, c], (value / 255 - CLIP_MEAN[c]) / CLIP_STD[c]))
    # bicubic: a hard edge overshoots (bilinear never leaves the input range)
    edge = np.zeros((10, 10, 3), dtype=np.uint8)
    edge[:, 5:] = 255
    raw = micro.preprocess([Image.fromarray(edge)]) * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(
        CLIP_MEAN).view(1, 3, 1, 1)
    assert raw.max() == 1.0 and raw.min() == 0.0  # PIL clamps to uint8 after its bicubic filter
    expected = np.asarray(Image.fromarray(edge).resize((28, 28), Image.Resampling.BICUBIC))
    torch.testing.assert_close(raw[0].permute(1, 2, 0) * 255, torch.from_numpy(expected.copy()).float(), atol=1e-3, rtol=0)


def test_vision_encoder_is_blip2_vision_model_with_ln_vision(micro):
    """Our ViT loop + fp32 ln_vision equals transformers' Blip2VisionModel.forward with ln_vision as its
    post_layernorm."""
    cfg = micro.config.vision
    hf = Blip2VisionModel(Blip2VisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        layer_norm_eps=cfg.layer_norm_eps, qkv_bias=True)).eval()
    hf.post_layernorm = torch.nn.LayerNorm(cfg.hidden_size, eps=cfg.ln_vision_eps)
    state = {k[len("model."):]: v for k, v in micro.vision.state_dict().items() if k.startswith("model.")}
    state.update({f"post_layernorm.{k}": v for k, v in micro.vision.ln_vision.state_dict().items()})
    hf.load_state_dict(state)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        torch.testing.assert_close(micro.vision(pixels).states, hf(pixels).last_hidden_state)


def test_bf16_keeps_ln_vision_and_codebook_in_fp32(photos):
    model = SeedTokenizer.from_pretrained("micro", dtype="bf16")
    assert model.dtype == torch.bfloat16
    assert model.vision.ln_vision.weight.dtype == torch.float32
    assert model.quantizer.embedding.weight.dtype == torch.float32
    fp32 = SeedTokenizer.from_pretrained("micro").encode(photos)
    assert (model.encode(photos) == fp32).float().mean() > 0.5


def test_decode_embeddings_shapes_and_batching(micro):
    ids = torch.randint(0, micro.codebook_size, (5, 32), generator=torch.Generator().manual_seed(0))
    emb = micro.decode_embeddings(ids)
    assert emb.shape == (5, micro.config.detokenizer.generation_dim)
    torch.testing.assert_close(micro.decode_embeddings(ids[2:3]), emb[2:3])
    assert micro.reconstruct_causal(ids).shape == (5, 32, micro.config.qformer.hidden_size)
    seed1 = SeedTokenizer.from_pretrained("micro-seed1")
    assert seed1.decode_embeddings(ids).shape == (5, 7, 48)


def test_reverse_qformer_is_not_causal():
    model = SeedTokenizer.from_pretrained("micro-seed1")
    rq = model.detokenizer.reverse_qformer
    assert not rq.config.causal and rq.config.num_queries == 7
    states = torch.randn(1, 32, rq.config.encoder_width)
    with torch.no_grad():
        base = rq(states)
        rq.query_tokens[:, 6] += 1.0
        assert not torch.equal(base[:, 0], rq(states)[:, 0])


@pytest.mark.parametrize("ids, message", [
    ([[0] * 31], "expected 32 ids"),
    ([[64] + [0] * 31], "must lie in"),
    ([[-1] + [0] * 31], "must lie in"),
    ([[0.5] * 32], "must be integers"),
])
def test_bad_ids_are_ids_errors(micro, ids, message):
    with pytest.raises(IdsError, match=message):
        micro.decode_embeddings(ids)


def test_bad_images_are_image_errors(micro, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    good = tmp_path / "good.png"
    Image.new("RGB", (50, 50)).save(good)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:40])
    for name in ("missing.png", "empty.png", "text.jpg", "trunc.png"):
        with pytest.raises(ImageError):
            micro.encode(tmp_path / name)
    with pytest.raises(ImageError):
        micro.encode(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ImageError):
        micro.encode(np.full((4, 4, 3), 2.0))


def test_bad_checkpoints_are_checkpoint_errors(micro, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder or preset"):
        SeedTokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="official"):
        SeedTokenizer.from_pretrained("seed2")
    folder = micro.save_pretrained(tmp_path / "a")
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        SeedTokenizer.from_pretrained(folder)
    other = SeedTokenizer.from_pretrained("micro-seed1").save_pretrained(tmp_path / "b")
    (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="does not match"):
        SeedTokenizer.from_pretrained(folder)


def test_save_leaves_no_temp_files_when_interrupted(micro, tmp_path, monkeypatch):
    import seedtok.models.tokenizer as mod

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        micro.save_pretrained(tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []


def test_tiny_stores_only_what_it_trains_and_round_trips(tmp_path, photos):
    """tiny: the registry-shipped EfficientNet and MiniLM text weights are reloaded, not stored."""
    from seedtok import preset

    model = SeedTokenizer(preset("tiny")).eval()
    stored = model.stored_state_dict()
    assert not any(k.startswith("vision.model.") or "word_embeddings" in k for k in stored)
    assert "vision.ln_vision.weight" in stored and "qformer.query_tokens" in stored
    assert sum(v.numel() for v in stored.values()) * 2 <= 40e6  # fp16 budget of the committed weights
    model.save_pretrained(tmp_path / "tiny")
    loaded = SeedTokenizer.from_pretrained(tmp_path / "tiny")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(loaded.encode(photos[:2]), model.encode(photos[:2]))


def test_fp16_storage_halves_the_file_and_loads_into_fp32(micro, tmp_path):
    micro.save_pretrained(tmp_path / "a")
    micro.save_pretrained(tmp_path / "b", dtype="fp16")
    a, b = (tmp_path / "a" / "model.safetensors").stat().st_size, (tmp_path / "b" / "model.safetensors").stat().st_size
    assert b < 0.55 * a
    loaded = SeedTokenizer.from_pretrained(tmp_path / "b")
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded.qformer.query_tokens, micro.qformer.query_tokens.half().float())


def test_bundled_preset_without_weights_is_a_clear_error(monkeypatch, tmp_path):
    import seedtok.models.tokenizer as mod

    monkeypatch.setitem(mod.BUNDLED, "tiny", tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="not in this install"):
        SeedTokenizer.from_pretrained("tiny")


def test_tiny_encodes_in_bf16(photos):
    from seedtok import preset

    model = SeedTokenizer(preset("tiny")).eval()
    fp32 = model.encode(photos[:2])
    model.set_dtype("bf16")
    assert model.vision.model._bn0.running_mean.dtype == torch.bfloat16
    assert (model.encode(photos[:2]) == fp32).float().mean() > 0.5


def test_a_freshly_built_tiny_backbone_is_in_inference_mode(photos):
    """Regression: a new module starts in training mode, where EfficientNet's batch norms use batch statistics
    and drop-connect is random; the frozen backbone must give from construction on the features that a loaded
    model gives (training caches them before any mode switch)."""
    from seedtok.config import preset

    fresh = SeedTokenizer(preset("tiny"))
    assert not any(m.training for m in fresh.vision.modules())
    pixels = fresh.preprocess(photos[:2])
    with torch.inference_mode():
        both = fresh.vision.features(pixels)
        alone = fresh.vision.features(pixels[:1])
        loaded = SeedTokenizer.from_pretrained("tiny").vision.features(pixels)
    torch.testing.assert_close(alone, both[:1], rtol=1e-4, atol=1e-4)  # no batch statistics
    torch.testing.assert_close(both, loaded, rtol=1e-4, atol=1e-4)


def test_tiny_multi_level_features_and_pooled_teacher(photos):
    """tiny reads EfficientNet levels 4 and 5 beside the head: each a mean token + 2x2 average-pooled cells,
    zero-padded to 1280; the generation teacher concatenates the three means (1280 + 112 + 320)."""
    import dataclasses

    import torch.nn.functional as F

    from seedtok.config import preset

    model = SeedTokenizer(preset("tiny")).eval()
    vision = model.vision
    pixels = model.preprocess(photos[:2])
    with torch.inference_mode():
        feats = vision.features(pixels)
        ends = vision.model.extract_endpoints(pixels)
    assert feats.shape == (2, 1 + 16 + 5 + 5, 1280) and vision.teacher_dim == 1712 == \
        model.config.detokenizer.generation_dim
    head = ends["reduction_6"].flatten(2).transpose(1, 2)
    torch.testing.assert_close(feats[:, 1:17], head)
    torch.testing.assert_close(feats[:, 0], head.mean(1))
    for start, level, width in ((17, 4, 112), (22, 5, 320)):
        cells = F.adaptive_avg_pool2d(ends[f"reduction_{level}"], 2).flatten(2).transpose(1, 2)
        torch.testing.assert_close(feats[:, start + 1:start + 5, :width], cells)
        torch.testing.assert_close(feats[:, start, :width], cells.mean(1))
        assert feats[:, start:start + 5, width:].abs().max() == 0  # zero padding
    teacher = vision.pooled_teacher(feats)
    torch.testing.assert_close(teacher, torch.cat([feats[:, 0], feats[:, 17, :112], feats[:, 22, :320]], -1))
    # the generation width must match the teacher, and only EfficientNet has levels
    bad = dataclasses.replace(preset("tiny"), detokenizer=dataclasses.replace(preset("tiny").detokenizer,
                                                                               generation_dim=1280))
    with pytest.raises(ConfigError, match="1712-d"):
        SeedTokenizer(bad)
    micro_cfg = preset("micro")
    with pytest.raises(ConfigError, match="extra_levels"):
        SeedTokenizer(dataclasses.replace(micro_cfg, vision=dataclasses.replace(micro_cfg.vision,
                                                                                extra_levels=(4,))))
