"""The tiny preset's image decoder (``TinyDecoder``) and its training, on the micro config: 48-d embeddings,
16x16 pixels, a 2-level UNet, 3 DDIM steps."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from seedtok.errors import CheckpointError, ConfigError  # noqa: E402
from seedtok.models.image_decoder import (DECODERS, DecodeInputError, TinyDecoder, build_image_decoder,  # noqa: E402
                                          build_tiny_pipeline, tiny_decoder_config)

D = 48
# the micro decoder with a regressed background colour instead of its learned palette
REGRESSED_BACKGROUND = dataclasses.replace(tiny_decoder_config("micro"), coarse_background_colours=0,
                                           coarse_background_ce=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: threads only add overhead


@pytest.fixture(scope="module")
def decoder():
    dec = TinyDecoder.random("micro")
    with torch.no_grad():  # a random UNet's output barely depends on the embedding; make it matter
        dec.pipeline.unet.class_embedding.linear_1.weight.mul_(20)
    return dec


def embeds(n, seed=0):
    return torch.rand(n, D, generator=torch.Generator().manual_seed(seed)) * 3


def spy(monkeypatch, decoder):
    """Record the class labels (embeddings) of every UNet call."""
    calls = []
    predict = decoder.pipeline.predict

    def record(sample, timestep, embeddings, coarse=None):
        calls.append(embeddings.detach().clone())
        return predict(sample, timestep, embeddings, coarse)

    monkeypatch.setattr(decoder.pipeline, "predict", record)
    return calls


# ------------------------------------------------------------------------------------------------ decode
def test_registered_and_decodes_a_batch(decoder):
    assert DECODERS["tiny"] is TinyDecoder
    assert decoder.size == (16, 16) and decoder.embedding_shape == (D,)
    assert decoder.vae_scale_factor == 2 and decoder.latent_channels == 12  # space-to-depth, no VAE
    assert (decoder.guidance_scale, decoder.num_inference_steps) == (2.0, 3)
    images = decoder.decode(embeds(3), seed=[1, 2, 3])
    assert len(images) == 3 and {im.size for im in images} == {(16, 16)} and {im.mode for im in images} == {"RGB"}
    pt = decoder.decode(embeds(3), seed=[1, 2, 3], output_type="pt")
    assert pt.shape == (3, 3, 16, 16) and 0 <= pt.min() and pt.max() <= 1
    np.testing.assert_array_equal(np.asarray(images[1]), (pt[1].permute(1, 2, 0).numpy() * 255).round())
    assert len(decoder.decode(embeds(1)[0], seed=0)) == 1  # one embedding without the batch axis


def test_batch_equals_one_at_a_time(decoder):
    emb, seeds = embeds(4), [5, 6, 7, 8]
    batched = decoder.decode(emb, seed=seeds, output_type="np")
    alone = np.concatenate([decoder.decode(emb[i:i + 1], seed=[seeds[i]], output_type="np") for i in range(4)])
    chunked = decoder.decode(emb, seed=seeds, batch_size=3, output_type="np")
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    np.testing.assert_allclose(batched, chunked, atol=1e-5)
    assert np.abs(batched[0] - batched[1]).max() > 0.01  # different embeddings and seeds: different images
    same_seed = decoder.decode(emb, seed=3, output_type="np")
    np.testing.assert_allclose(same_seed[2], decoder.decode(emb[2], seed=3, output_type="np")[0], atol=1e-5)


def test_guidance_uses_zeros_or_the_negative_embedding(decoder, monkeypatch):
    emb = embeds(2)
    calls = spy(monkeypatch, decoder)
    default = decoder.decode(emb, seed=0, output_type="np")
    assert len(calls) == 3 and calls[0].shape == (4, D)  # one UNet batch per step: [uncond; cond]
    torch.testing.assert_close(calls[0][:2], torch.zeros(2, D))
    torch.testing.assert_close(calls[0][2:], emb)
    calls.clear()
    negative = embeds(1, seed=9)
    guided = decoder.decode(emb, seed=0, negative_embeddings=negative, output_type="np")
    torch.testing.assert_close(calls[0][:2], negative.expand(2, D))
    assert np.abs(guided - default).max() > 1e-3  # the negative changes the result
    calls.clear()
    plain = decoder.decode(emb, seed=0, guidance_scale=1.0, output_type="np")
    assert calls[0].shape == (2, D)  # no guidance: no unconditional rows
    np.testing.assert_allclose(decoder.decode(emb, seed=0, guidance_scale=1.0, negative_embeddings=negative,
                                              output_type="np"), plain)


def test_strength_refines_the_noised_coarse_image(tmp_path, monkeypatch):
    """strength s < 1 (SDEdit): start from the coarse image noised to the level of the last s share of the
    timesteps and run only those; s = 1 (default) samples from pure noise; stored in model_index.json."""
    dec = TinyDecoder.random(dataclasses.replace(tiny_decoder_config("micro"), num_inference_steps=4,
                                                 strength=0.5))
    pipe = dec.pipeline
    emb = embeds(2)
    noise = torch.randn(2, 12, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    predict = pipe.predict
    monkeypatch.setattr(pipe, "predict", lambda sample, t, e, c=None: seen.append((sample.clone(), t)) or
                        predict(sample, t, e, c))
    pipe(image_embeds=emb, latents=noise, guidance_scale=1.0, output_type="pt")  # the config's 0.5
    pipe.scheduler.set_timesteps(4)
    start = pipe.scheduler.timesteps[2]
    assert [t for _, t in seen] == pipe.scheduler.timesteps[2:].tolist()  # the last half of the steps
    expected = pipe.scheduler.add_noise(pipe.coarse_latents(emb, 16, 16), noise, start.expand(2))
    torch.testing.assert_close(seen[0][0], expected)
    assert not torch.allclose(seen[0][0], noise, atol=0.1)
    seen.clear()
    pipe(image_embeds=emb, latents=noise, guidance_scale=2.0, strength=0.25, output_type="pt")
    assert len(seen) == 1 and seen[0][0].shape[0] == 4  # guided: [uncond; cond], both from the cond drawing
    torch.testing.assert_close(seen[0][0][2:], pipe.scheduler.add_noise(
        pipe.coarse_latents(emb, 16, 16), noise, pipe.scheduler.timesteps[3].expand(2)))
    seen.clear()
    pipe(image_embeds=emb, latents=noise, guidance_scale=1.0, strength=1.0, output_type="pt")
    assert len(seen) == 4 and torch.equal(seen[0][0], noise)  # strength 1: pure noise, every step
    with pytest.raises(ValueError, match="strength"):
        pipe(image_embeds=emb, strength=0.0)
    dec.save_pretrained(tmp_path / "dec")
    assert TinyDecoder.from_pretrained(tmp_path / "dec").pipeline.config.strength == 0.5


def test_given_latents_and_bad_inputs(decoder):
    emb = embeds(2)
    latents = torch.randn(1, 12, 8, 8, generator=torch.Generator().manual_seed(0))
    first = decoder.decode(emb, latents=latents, output_type="np")
    np.testing.assert_array_equal(first, decoder.decode(emb, latents=latents.expand(2, -1, -1, -1), seed=4,
                                                        output_type="np"))
    with pytest.raises(DecodeInputError, match=r"\[B, 48\]"):
        decoder.decode(torch.zeros(2, 32))
    with pytest.raises(DecodeInputError, match="latents"):
        decoder.decode(emb, latents=torch.zeros(1, 3, 16, 16))
    with pytest.raises(DecodeInputError, match="seeds"):
        decoder.decode(emb, seed=[1, 2, 3])


def test_pipeline_called_directly_draws_its_own_noise_of_the_output_channels(decoder):
    """Called as a diffusers pipeline without ``latents``, it draws the noise itself: of the UNet's output
    channels (its input adds the coarse image's), from the given generators as `decode` does with seeds."""
    emb = embeds(2)
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    direct = decoder.pipeline(image_embeds=emb, generator=generators, output_type="np").images
    np.testing.assert_array_equal(direct, decoder.decode(emb, seed=[5, 6], output_type="np"))


# ------------------------------------------------------------------------------------------------ save/load
def test_save_load_round_trip_is_exact(decoder, tmp_path):
    decoder.save_pretrained(tmp_path / "dec")
    index = json.loads((tmp_path / "dec" / "model_index.json").read_text())
    assert index["_class_name"] == "TinyDecoderPipeline" and index["patch_size"] == 2
    assert (tmp_path / "dec" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    again = build_image_decoder("tiny", tmp_path / "dec")
    for (k, a), b in zip(decoder.pipeline.unet.state_dict().items(), again.pipeline.unet.state_dict().values()):
        assert torch.equal(a, b), k
    emb = embeds(2)
    np.testing.assert_array_equal(decoder.decode(emb, seed=4, output_type="np"),
                                  again.decode(emb, seed=4, output_type="np"))
    # fp16 storage: half the bytes, weights equal to the fp16-rounded ones, loads back as fp32
    decoder.save_pretrained(tmp_path / "half", dtype="fp16")
    half = TinyDecoder.from_pretrained(tmp_path / "half")
    assert half.dtype == torch.float32 and decoder.dtype == torch.float32
    for a, b in zip(decoder.pipeline.unet.parameters(), half.pipeline.unet.parameters()):
        assert torch.equal(a.half().float(), b)
    with pytest.raises(CheckpointError, match="no tiny image decoder"):
        TinyDecoder.from_pretrained(tmp_path)


def test_tiny_config_fits_the_bundle_limit():
    cfg = tiny_decoder_config("tiny")
    assert (cfg.embed_dim, cfg.image_size) == (1712, 64)  # the tiny tokenizer's 3-level pooled teacher
    pipe = build_tiny_pipeline(cfg)
    assert pipe.unet.config.sample_size * cfg.patch_size == 64
    params = [*pipe.unet.parameters(), *pipe.coarse.parameters()]
    assert sum(p.numel() for p in params) * 2 <= 20e6  # fp16 on disk <= 20 MB
    with pytest.raises(ConfigError, match="no tiny decoder config"):
        tiny_decoder_config("seed2")


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def micro_data(tmp_path_factory):
    from seedtok.config import preset
    from seedtok.data.sources import open_source
    from seedtok.train.decoder import DecoderData

    return DecoderData(preset("micro"), open_source("emoji:train:16"), "emoji:train:16", 16,
                       cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def test_data_pixels_and_teacher(micro_data, micro):
    from seedtok.data.sources import open_source

    batch = micro_data.batch([0, 3])
    assert batch["pixels"].shape == (2, 3, 16, 16) and batch["embeds"].shape == (2, D)
    assert -1 <= batch["pixels"].min() and batch["pixels"].max() <= 1
    sample = open_source("emoji:train:16")[3]
    expected = np.asarray(sample.image.resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(batch["pixels"][1].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    # the teacher is the stage-2 target: the micro tokenizer's pooled (first) vision state, fp16-cached
    with torch.no_grad():
        feats = micro.vision.features(micro.preprocess([sample.image]))[:, 0]
    torch.testing.assert_close(batch["embeds"][1], feats[0].half().float())


def test_teacher_is_read_from_the_tokenizer_feature_cache(tmp_path):
    from safetensors.torch import save_file

    from seedtok.config import preset
    from seedtok.data.sources import open_source
    from seedtok.train.data import _cache_key
    from seedtok.train.decoder import DecoderData, _ConfigHolder

    spec = "emoji:train:8"
    features = torch.randn(8, 5, D).half()
    key = _cache_key(_ConfigHolder(preset("micro")), spec, "features")
    save_file({"features": features}, str(tmp_path / f"features-{key}.safetensors"))
    data = DecoderData(preset("micro"), open_source(spec), spec, 16, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(data.teacher, features[:, 0])


def test_training_steps_lower_the_loss_on_a_fixed_batch(micro_data):
    from seedtok.train.decoder import DecoderModel, DecoderTask

    dec = TinyDecoder.random("micro")
    model, task = DecoderModel(dec), DecoderTask(dec)
    assert task.cond_dropout == 0.1
    assert {n for n, _ in task.trainable_parameters(model)} == \
        {f"unet.{n}" for n, _ in dec.pipeline.unet.named_parameters()} | \
        {f"coarse.{n}" for n, _ in dec.pipeline.coarse.named_parameters()}
    batch = micro_data.batch(list(range(8)))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def loss():
        torch.manual_seed(0)  # the same noise, timesteps and dropout each time
        return task.loss(model, batch)[0]

    task.train_mode(model)
    before = loss().item()
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.9 * before


def test_condition_dropout_zeroes_embeddings(micro_data, monkeypatch):
    from seedtok.train.decoder import DecoderModel, DecoderTask

    dec = TinyDecoder.random("micro")
    task = DecoderTask(dec)
    task.cond_dropout = 0.5
    seen = []
    forward = dec.pipeline.unet.forward
    monkeypatch.setattr(dec.pipeline.unet, "forward",
                        lambda *a, class_labels=None, **k: seen.append(class_labels) or forward(
                            *a, class_labels=class_labels, **k))
    batch = micro_data.batch(list(range(16)))
    torch.manual_seed(1)
    task.loss(DecoderModel(dec), batch)
    dropped = (seen[0] == 0).all(1)
    assert 0 < dropped.sum() < 16
    torch.testing.assert_close(seen[0][~dropped], batch["embeds"][~dropped])


def test_train_resume_is_exact_and_the_result_loads(tmp_path):
    from seedtok.config import preset
    from seedtok.data.sources import open_source
    from seedtok.train.decoder import DecoderData, DecoderModel, DecoderTask, load_decoder_run_config, \
        new_decoder, train_decoder
    from seedtok.train.loop import Trainer

    full = train_decoder("micro", out=tmp_path / "full", progress=False)
    assert full.steps == 4 and (tmp_path / "full" / "final" / "model_index.json").is_file()
    # interrupted after 3 steps (checkpoint at 2), then resumed
    _, dec_cfg, train_cfg = load_decoder_run_config("micro")
    data = DecoderData(preset("micro"), open_source(train_cfg.data), train_cfg.data, 16,
                       cache_dir=tmp_path / "cache", progress=False, target=dec_cfg.target)
    dec = new_decoder(dec_cfg, data)
    Trainer(train_cfg, DecoderModel(dec), DecoderTask.for_config(dec, dec_cfg), data,
            tmp_path / "cut", progress=False).fit(stop_after=3)
    resumed = train_decoder("micro", out=tmp_path / "cut", resume=True, export=tmp_path / "half", progress=False)
    assert resumed.steps == 4
    full_dec = TinyDecoder.from_pretrained(tmp_path / "full" / "final").pipeline
    cut_dec = TinyDecoder.from_pretrained(tmp_path / "cut" / "final").pipeline
    for part in ("unet", "coarse"):  # the coarse head (and its input statistics) resume exactly too
        a, b = getattr(full_dec, part).state_dict(), getattr(cut_dec, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(full_dec.coarse.input_std, torch.ones_like(full_dec.coarse.input_std))
    assert TinyDecoder.from_pretrained(tmp_path / "half").embedding_shape == (D,)
    with pytest.raises(ConfigError, match="--resume"):
        train_decoder("micro", out=tmp_path / "full", progress=False)
    with pytest.raises(ConfigError, match="no image decoder recipe"):
        train_decoder("seed2", out=tmp_path / "x", progress=False)


def test_coarse_only_trains_a_new_head_on_a_frozen_unet(tmp_path, monkeypatch):
    from seedtok.train.decoder import train_decoder

    train_decoder("micro", out=tmp_path / "full", progress=False)
    calls = []
    pipeline_class = type(TinyDecoder.random("micro").pipeline)
    predict = pipeline_class.predict
    monkeypatch.setattr(pipeline_class, "predict", lambda self, *a, **k: calls.append(1) or predict(self, *a, **k))
    result = train_decoder("micro", out=tmp_path / "head", coarse_only=True, init=tmp_path / "full" / "final",
                           progress=False)
    assert result.steps == 4 and not calls  # the UNet never ran
    full = TinyDecoder.from_pretrained(tmp_path / "full" / "final").pipeline
    head = TinyDecoder.from_pretrained(tmp_path / "head" / "final").pipeline
    a, b = full.unet.state_dict(), head.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the UNet is the init's
    fresh = TinyDecoder.random("micro").pipeline.coarse.state_dict()
    c = head.coarse.state_dict()
    assert not torch.equal(c["net.0.weight"], fresh["net.0.weight"])  # a trained head
    with pytest.raises(ConfigError, match="--init"):
        train_decoder("micro", out=tmp_path / "x", coarse_only=True, progress=False)
    with pytest.raises(ConfigError, match="--coarse-only"):
        train_decoder("micro", out=tmp_path / "y", init=tmp_path / "full" / "final", progress=False)


def test_unet_only_fine_tunes_the_unet_under_the_frozen_head_at_its_decode_temperature(tmp_path, monkeypatch):
    from seedtok.models.image_decoder import CoarseHead
    from seedtok.train.decoder import train_decoder

    train_decoder("micro", out=tmp_path / "full", progress=False)
    temperatures = []
    forward = CoarseHead.forward
    monkeypatch.setattr(CoarseHead, "forward",
                        lambda self, x, temperature=1.0, **k: temperatures.append(temperature)
                        or forward(self, x, temperature=temperature, **k))
    result = train_decoder("micro", out=tmp_path / "unet", unet_only=True, init=tmp_path / "full" / "final",
                           progress=False)
    full = TinyDecoder.from_pretrained(tmp_path / "full" / "final").pipeline
    tuned = TinyDecoder.from_pretrained(tmp_path / "unet" / "final").pipeline
    assert result.steps == 4 and temperatures  # the head drew the UNet's inputs ...
    assert set(temperatures) == {full.config.coarse_temperature} != {1.0}  # ... as it does when decoding
    a, b = full.coarse.state_dict(), tuned.coarse.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the head is the init's, untouched
    a, b = full.unet.state_dict(), tuned.unet.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # from the init's UNet, trained further
    with pytest.raises(ConfigError, match="--init"):
        train_decoder("micro", out=tmp_path / "x", unet_only=True, progress=False)
    with pytest.raises(ConfigError, match="exclude each other"):
        train_decoder("micro", out=tmp_path / "y", unet_only=True, coarse_only=True, init=tmp_path / "full" / "final",
                      progress=False)


def test_coarse_head_conditions_the_unet_and_learns_only_from_its_own_loss(micro_data, monkeypatch):
    """Coarse-then-refine: the head's image (bilinearly upsampled, space-to-depth) joins the UNet's input
    channels; the head learns from its own MSE (to the area-downsampled target, whole batch) only; the UNet
    sees the first ``unet_batch`` samples."""
    import torch.nn.functional as F

    from seedtok.train.decoder import DecoderModel, DecoderTask

    dec = TinyDecoder.random("micro")
    pipe = dec.pipeline
    assert pipe.unet.config.in_channels == 2 * 3 * 2 ** 2  # noisy pixels + the coarse image
    task = DecoderTask(dec, embed_noise=0.0, unet_batch=3)
    task.cond_dropout = 0.0
    seen = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda sample, *a, **k: seen.append(sample) or forward(sample, *a, **k))
    batch = micro_data.batch(list(range(8)))
    torch.manual_seed(0)
    loss, logs = task.loss(DecoderModel(dec), batch)
    coarse = pipe.coarse(batch["embeds"])
    assert seen[0].shape == (3, 24, 8, 8)
    expected = pipe.to_latents(F.interpolate(coarse[:3], size=(16, 16), mode="bilinear", align_corners=False))
    torch.testing.assert_close(seen[0][:, 12:], expected)
    own = F.mse_loss(coarse, F.interpolate(batch["pixels"], size=(8, 8), mode="area"))
    assert logs["coarse_mse"] == pytest.approx(own.item(), rel=1e-5)
    head = list(pipe.coarse.parameters())
    for got, want in zip(torch.autograd.grad(loss, head), torch.autograd.grad(own, head)):
        torch.testing.assert_close(got, want)  # the diffusion loss gives the head no gradient


def test_target_condition_shows_the_unet_the_targets_own_drawing(micro_data, monkeypatch):
    """unet_condition="target" (cascaded diffusion's super-resolution stage): the UNet's coarse input is the
    target downsampled as the head's MSE target is, plus per-image noise of std up to ``coarse_augment``; with
    --unet-only the head is not run at all."""
    import torch.nn.functional as F

    from seedtok.models.image_decoder import CoarseHead
    from seedtok.train.decoder import DecoderModel, DecoderTask

    cfg = dataclasses.replace(tiny_decoder_config("micro"), unet_condition="target")
    dec = TinyDecoder.random(cfg)
    pipe = dec.pipeline
    seen = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda sample, *a, **k: seen.append(sample) or forward(sample, *a, **k))
    batch = micro_data.batch(list(range(8)))
    small = F.interpolate(batch["pixels"][:3], size=(8, 8), mode="area")
    clean = pipe.upsample_coarse(small, 16, 16)
    task = DecoderTask(dec, unet_batch=3, unet_condition="target")
    task.loss(DecoderModel(dec), batch)
    torch.testing.assert_close(seen[-1][:, 12:], clean)  # the target's drawing, not the head's
    assert not torch.allclose(clean, pipe.coarse_latents(batch["embeds"][:3], 16, 16), atol=0.1)
    task = DecoderTask.for_config(dec, dataclasses.replace(cfg, coarse_augment=0.5), train_parts="unet")
    monkeypatch.setattr(CoarseHead, "forward", lambda *a, **k: pytest.fail("the head ran"))
    torch.manual_seed(0)
    task.loss(DecoderModel(dec), batch)
    noisy = seen[-1][:, 12:]
    assert not torch.allclose(noisy, clean, atol=1e-3) and noisy.abs().max() <= 1.0  # augmented, in range
    assert (noisy - clean).std() < 0.5
    with pytest.raises(ConfigError, match="unet_condition"):
        DecoderTask(dec, unet_condition="truth")
    with pytest.raises(ConfigError, match="unet_condition"):
        TinyDecoder.random(dataclasses.replace(cfg, unet_condition="truth"))


def test_target_condition_guides_both_halves_from_the_conditional_drawing(tmp_path, monkeypatch):
    """A UNet trained on the target's drawing saw it with dropped embeddings too, so guidance's unconditional
    half gets the conditional half's drawing (with "head", the null embedding's own); saved with the decoder."""
    cfg = dataclasses.replace(tiny_decoder_config("micro"), unet_condition="target")
    emb = embeds(2)
    for name, config in (("head", tiny_decoder_config("micro")), ("target", cfg)):
        pipe = TinyDecoder.random(config).pipeline
        seen = []
        predict = pipe.predict
        monkeypatch.setattr(pipe, "predict", lambda sample, t, e, c=None: seen.append(c) or predict(sample, t, e, c))
        pipe(image_embeds=emb, guidance_scale=2.0, output_type="pt")
        uncond, cond = seen[0].chunk(2)
        torch.testing.assert_close(cond, pipe.coarse_latents(emb, 16, 16))
        assert torch.equal(uncond, cond) == (name == "target")
    dec = TinyDecoder.random(cfg)
    dec.save_pretrained(tmp_path / "dec")
    assert TinyDecoder.from_pretrained(tmp_path / "dec").pipeline.config.unet_condition == "target"


def test_centred_targets_are_the_scorers_view(tmp_path):
    from seedtok.config import preset
    from seedtok.data.sources import open_source
    from seedtok.evaluate.emoji_scorer import normalize_scene
    from seedtok.train.decoder import DecoderData

    spec = "emoji:train:4"
    data = DecoderData(preset("micro"), open_source(spec), spec, 16, cache_dir=tmp_path, progress=False,
                       target="centred")
    scene = DecoderData(preset("micro"), open_source(spec), spec, 16, cache_dir=tmp_path, progress=False)
    sample = open_source(spec)[2]
    view = normalize_scene(sample.image).resize((16, 16), Image.Resampling.BICUBIC)
    expected = np.asarray(view, dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(data.batch([2])["pixels"][0].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert not torch.equal(data.pixels, scene.pixels)  # its own cache entry
    torch.testing.assert_close(data.teacher, scene.teacher)


def test_coarse_head_standardises_its_input():
    dec = TinyDecoder.random("micro")
    head = dec.pipeline.coarse
    emb = torch.randn(64, D) * torch.linspace(0.1, 10, D) + 5
    head.set_input_stats(emb)
    torch.testing.assert_close(head.input_mean, emb.mean(0))
    torch.testing.assert_close(head.input_std, emb.std(0))
    # a shift and scale of the data, with matching statistics, gives the same images
    other = TinyDecoder.random("micro").pipeline.coarse
    other.set_input_stats(emb * 3 - 2)
    torch.testing.assert_close(other(emb * 3 - 2), head(emb), rtol=1e-4, atol=1e-4)


def test_prototype_head_composites_the_chosen_prototype_on_its_background():
    """coarse_prototypes=K: softmax over K learned RGBA images, mixed, composited on a predicted colour."""
    head = TinyDecoder.random(REGRESSED_BACKGROUND).pipeline.coarse
    k, size = head.config.prototypes, head.config.size
    assert k == tiny_decoder_config("micro").coarse_prototypes > 0 and head.prototype_images.shape == (k, 4, size, size)
    colour = torch.tensor([0.5, -0.25, 0.0])
    with torch.no_grad():
        head.prototype_images.normal_()
        last = head.net[-1]
        last.weight.zero_()
        last.bias.zero_()
        last.bias[2] = 50.0  # prototype 2 takes (almost) all the weight
        last.bias[k:] = torch.atanh(colour)
    out = head(embeds(2))
    alpha = head.prototype_images[2, 3].sigmoid()
    expected = alpha * head.prototype_images[2, :3] + (1 - alpha) * colour[:, None, None]
    torch.testing.assert_close(out, expected.expand(2, 3, size, size).detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # equal logits: the mean of the prototypes' colour and alpha
        last.bias[:k] = 0.0
    mix = head.prototype_images.mean(0)
    alpha = mix[3].sigmoid()
    torch.testing.assert_close(head(embeds(1))[0], (alpha * mix[:3] + (1 - alpha) * colour[:, None, None]).detach(),
                               rtol=1e-5, atol=1e-5)


def test_prototype_temperature_sharpens_the_mix_and_is_a_saved_decode_setting(tmp_path):
    import torch.nn.functional as F

    dec = TinyDecoder.random(dataclasses.replace(REGRESSED_BACKGROUND, coarse_temperature=0.25))
    head = dec.pipeline.coarse
    k = head.config.prototypes
    emb = embeds(3)
    with torch.no_grad():
        out = head.net((emb - head.input_mean) / head.input_std)
        weights = (out[:, :k] / 0.25).softmax(-1)
        mix = torch.einsum("bk,kchw->bchw", weights, head.prototype_images)
        alpha = mix[:, 3:].sigmoid()
        expected = alpha * mix[:, :3] + (1 - alpha) * torch.tanh(out[:, k:])[:, :, None, None]
        torch.testing.assert_close(head(emb, temperature=0.25), expected)
        assert not torch.allclose(head(emb), expected)  # training's temperature 1 differs
        torch.testing.assert_close(dec.pipeline.coarse_latents(emb, 16, 16),
                                   dec.pipeline.to_latents(F.interpolate(expected, size=(16, 16), mode="bilinear",
                                                                         align_corners=False)))
    dec.save_pretrained(tmp_path / "dec")
    assert TinyDecoder.from_pretrained(tmp_path / "dec").pipeline.config.coarse_temperature == 0.25


def test_prototypes_start_as_training_targets_with_an_alpha_from_the_border():
    head = TinyDecoder.random("micro").pipeline.coarse
    k, size = head.config.prototypes, head.config.size
    images = torch.full((10, 3, size * 2, size * 2), 40, dtype=torch.uint8)  # a flat border colour...
    images[:, :, 4:8, 6:12] = torch.arange(10, dtype=torch.uint8)[:, None, None, None] * 15 + 100  # ...and a subject
    head.init_prototypes(images, seed=3)
    small = torch.nn.functional.interpolate(images.float() / 127.5 - 1, size=(size, size), mode="area")
    picked = [int(((small - p[:3]).abs().amax(dim=(1, 2, 3)) < 1e-6).nonzero()) for p in head.prototype_images]
    assert len(set(picked)) == k  # K distinct images, each copied exactly
    alpha = head.prototype_images[:, 3]
    assert set(alpha.unique().tolist()) == {-3.0, 3.0}
    assert (alpha[:, 2:4, 3:6] == 3).all() and (alpha[:, 0] == -3).all() and (alpha[:, -1] == -3).all()
    other = TinyDecoder.random("micro").pipeline.coarse
    other.init_prototypes(images, seed=3)
    torch.testing.assert_close(other.prototype_images, head.prototype_images)  # deterministic by seed
    with pytest.raises(ValueError, match="at least"):
        other.init_prototypes(images[:k - 1])


def three_subjects() -> torch.Tensor:
    """12 uint8 8x8 scenes: one subject on ten background colours (0-9), and two other subjects (10, 11)."""
    images = torch.zeros(12, 3, 8, 8, dtype=torch.uint8)
    images[:10] = torch.arange(10, dtype=torch.uint8)[:, None, None, None] * 20
    images[:10, :, 2:6, 2:6] = 250
    images[10, :, 1:7, 3:5] = torch.tensor([250, 0, 0], dtype=torch.uint8)[:, None, None]
    images[11, :, 3:5, 1:7] = torch.tensor([0, 0, 250], dtype=torch.uint8)[:, None, None]
    return images


def test_kmeans_plus_plus_prototypes_cover_distinct_subjects_whatever_the_background():
    from seedtok.models.image_decoder import _coarse_head_class

    head = _coarse_head_class()(embed_dim=4, size=8, hidden=8, prototypes=3)
    # ten copies of one subject on ten background colours, and two other subjects: a random pick of 3 of the
    # 12 usually repeats the first subject; k-means++ on the subjects alone never does
    images = three_subjects()
    small = images.float() / 127.5 - 1

    def subjects(head):
        picked = [int(((small - p[:3]).abs().amax(dim=(1, 2, 3)) < 1e-6).nonzero()) for p in head.prototype_images]
        return sorted(0 if i < 10 else i for i in picked)

    repeats = 0
    for seed in range(8):
        head.init_prototypes(images, seed=seed, method="kmeans++")
        assert subjects(head) == [0, 10, 11]
        head.init_prototypes(images, seed=seed, method="random")
        repeats += len(set(subjects(head))) < 3
    assert repeats > 0  # the random pick does repeat a subject for some seed
    again = _coarse_head_class()(embed_dim=4, size=8, hidden=8, prototypes=3)
    again.init_prototypes(images, seed=7, method="kmeans++")
    head.init_prototypes(images, seed=7, method="kmeans++")
    torch.testing.assert_close(again.prototype_images, head.prototype_images)  # deterministic by seed
    with pytest.raises(ConfigError, match="prototype init"):
        head.init_prototypes(images, method="farthest")


def test_emoji_prototypes_start_one_per_emoji_from_a_typical_drawing():
    from seedtok.models.image_decoder import _coarse_head_class

    head = _coarse_head_class()(embed_dim=4, size=8, hidden=8, prototypes=4)
    images = three_subjects()
    images[9] = 235  # on this light background the subject (250) hides: its drawing is not a typical one
    images[9, :, 2:6, 2:6] = 250
    labels = torch.tensor([2] * 10 + [0, 3])  # emoji 1 has no training scene
    pick = head.init_prototypes(images, seed=0, method="emoji", labels=labels)
    assert int(pick[0]) == 10 and int(pick[3]) == 11 and int(pick[2]) in range(9)
    assert (head.prototype_images[2, 3, 2:6, 2:6] > 0).all()  # emoji 2's prototype: its subject, opaque
    assert (head.prototype_images[0, 3, 1:7, 3:5] > 0).all() and (head.prototype_images[0, 3, :, :3] < 0).all()
    with pytest.raises(ConfigError, match="0..3"):
        head.init_prototypes(images, method="emoji", labels=labels + 1)
    with pytest.raises(ConfigError, match="one label per"):
        head.init_prototypes(images, method="emoji")


def test_emoji_prototype_targets_are_the_scenes_emoji(micro_data, tmp_path):
    import copy

    from seedtok.data.sources import Sample
    from seedtok.train.decoder import new_decoder

    truth = torch.tensor([micro_data.samples[i].meta["emoji_index"] for i in range(len(micro_data))])
    cfg = dataclasses.replace(tiny_decoder_config("micro"), coarse_prototypes=int(truth.max()) + 1,
                              coarse_prototype_init="emoji")
    data = copy.copy(micro_data)
    data._labels_cache = tmp_path / "labels.safetensors"
    dec = new_decoder(cfg, data)
    assert torch.equal(data.prototype_targets, truth) and data._labels_cache.is_file()  # read once, cached
    head = dec.pipeline.coarse
    for k in truth.unique().tolist():  # each emoji's prototype is one of its own scenes' subject
        rgb, _ = head._subjects(micro_data.pixels[truth == k], 0.19)
        assert any(torch.allclose(head.prototype_images[k, :3], r, atol=1e-5) for r in rgb)
    blank = copy.copy(micro_data)
    blank.samples = [Sample(micro_data.samples[0].image, "a scene")] * len(micro_data)
    blank._labels_cache = tmp_path / "blank.safetensors"
    with pytest.raises(ConfigError, match="emoji_index"):
        new_decoder(cfg, blank)


def test_prototype_refit_recovers_each_drawing_and_its_alpha_from_scenes_on_several_backgrounds():
    from seedtok.models.image_decoder import _coarse_head_class

    head = _coarse_head_class()(embed_dim=4, size=8, hidden=8, prototypes=4)
    g = torch.Generator().manual_seed(0)
    colour = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    alpha = torch.zeros(4, 1, 8, 8)  # a transparent border, so each scene's border colour is its background
    alpha[:, :, 2:6, 2:6] = torch.rand(4, 1, 4, 4, generator=g) * 0.8 + 0.2
    labels = torch.tensor([0] * 4 + [1] * 3 + [3])  # class 2: no scene; class 3: one background only
    backgrounds = torch.rand(len(labels), 3, generator=g) * 2 - 1
    images = alpha[labels] * colour[labels] + (1 - alpha[labels]) * backgrounds[:, :, None, None]
    before = head.prototype_images.detach().clone()
    assert head.fit_prototypes(images, labels, ridge=1e-6) == 3
    fitted = head.prototype_images.detach()
    a = fitted[:2, 3].sigmoid()
    assert torch.allclose(a, alpha[:2, 0], atol=3e-3)  # alpha logits are kept within ±6
    inside = alpha[:2].expand(-1, 3, -1, -1) > 0.05
    assert torch.allclose(fitted[:2, :3][inside], colour[:2][inside], atol=1e-3)
    assert torch.equal(fitted[2], before[2])  # no scene: kept
    # one background: alpha and colour are not told apart; the ridge keeps the solve finite and near the start
    assert torch.isfinite(fitted[3]).all() and not torch.equal(fitted[3], before[3])
    with pytest.raises(ConfigError, match="0..3"):
        head.fit_prototypes(images, labels + 1)


def test_refit_prototypes_changes_only_the_prototypes_of_a_trained_decoder(tmp_path):
    from seedtok.cli import main
    from seedtok.config import preset
    from seedtok.data.sources import open_source
    from seedtok.train.decoder import DecoderData

    decoder = {"coarse_prototypes": 1142, "coarse_prototype_init": "emoji", "coarse_prototype_ce": 1.0}
    (tmp_path / "run.json").write_text(json.dumps({"model": "micro", "decoder": {**decoder, "strength": 0.5,
                                                                                 "coarse_temperature": 0.3},
                                                   "train": {"data": "emoji:train:24"}}))
    cfg = dataclasses.replace(tiny_decoder_config("micro"), **decoder)
    TinyDecoder.random(cfg).save_pretrained(tmp_path / "init")
    assert main(["train", "decoder", "--config", str(tmp_path / "run.json"), "--refit-prototypes",
                 "--init", str(tmp_path / "init"), "--out", str(tmp_path / "refit"),
                 "--export", str(tmp_path / "fp16")]) == 0
    init = TinyDecoder.from_pretrained(tmp_path / "init").pipeline
    refit = TinyDecoder.from_pretrained(tmp_path / "refit" / "final").pipeline
    a, b = init.unet.state_dict(), refit.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the UNet is the init's
    # the decode settings are the config's
    assert (refit.config.strength, refit.config.coarse_temperature) == (0.5, 0.3) != (init.config.strength,
                                                                                      init.config.coarse_temperature)
    a = {k: v.clone() for k, v in init.coarse.state_dict().items()}
    b = refit.coarse.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "prototype_images")  # and the MLP, colours, stats
    data = DecoderData(preset("micro"), open_source("emoji:train:24"), "emoji:train:24", 16, progress=False,
                       cache_dir=tmp_path / "cache", target=cfg.target, embeddings=False)
    labels = data.emoji_labels()
    expected = init.coarse
    expected.fit_prototypes(data.pixels, labels)
    assert torch.allclose(refit.coarse.prototype_images, expected.prototype_images)
    seen = labels.unique()
    unseen = torch.ones(1142, dtype=torch.bool)
    unseen[seen] = False
    assert torch.equal(refit.coarse.prototype_images[unseen], a["prototype_images"][unseen])
    assert not torch.allclose(refit.coarse.prototype_images[seen], a["prototype_images"][seen])
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "fp16" / "coarse" / "diffusion_pytorch_model.safetensors"))
    assert stored["prototype_images"].dtype == torch.float16  # --export: the bundled form
    # user errors: one line, exit 2
    assert main(["train", "decoder", "--config", str(tmp_path / "run.json"), "--refit-prototypes"]) == 2
    assert main(["train", "decoder", "--config", str(tmp_path / "run.json"), "--refit-prototypes",
                 "--init", str(tmp_path / "init"), "--out", str(tmp_path / "refit")]) == 2  # would overwrite
    assert main(["train", "decoder", "--config", "micro", "--refit-prototypes",  # not one prototype per emoji
                 "--init", str(tmp_path / "init"), "--out", str(tmp_path / "r2")]) == 2


def test_targets_alone_are_rendered_or_read_from_a_runs_pixel_cache(micro_data, monkeypatch):
    from seedtok.config import preset
    from seedtok.train.decoder import DecoderData

    cache_dir = micro_data._labels_cache.parent  # the fixture's run cache (pixels + teacher)
    samples = micro_data.samples
    rendered = DecoderData(preset("micro"), samples, "emoji:train:16-other", 16, cache_dir=cache_dir,
                           progress=False, embeddings=False)  # no cache for this spec: rendered
    assert torch.equal(rendered.pixels, micro_data.pixels) and rendered.embeds is None
    monkeypatch.setattr(DecoderData, "_target_pixels", lambda *a: (_ for _ in ()).throw(AssertionError))
    cached = DecoderData(preset("micro"), samples, "emoji:train:16", 16, cache_dir=cache_dir, progress=False,
                         embeddings=False)
    assert torch.equal(cached.pixels, micro_data.pixels)


def test_training_with_refit_fits_the_trained_prototypes_to_their_classes(tmp_path):
    from seedtok.config import preset
    from seedtok.data.sources import open_source
    from seedtok.train.decoder import DecoderData, new_decoder, train_decoder

    for name, refit in (("plain", False), ("refit", True)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"model": "micro", "decoder": {
            "coarse_prototype_refit": refit}}))
        train_decoder(str(tmp_path / f"{name}.json"), out=tmp_path / name, progress=False)
    plain = TinyDecoder.from_pretrained(tmp_path / "plain" / "final").pipeline.coarse
    refit = TinyDecoder.from_pretrained(tmp_path / "refit" / "final").pipeline.coarse
    cfg = tiny_decoder_config("micro")
    data = DecoderData(preset("micro"), open_source("emoji:train:16"), "emoji:train:16", 16, progress=False,
                       cache_dir=tmp_path / "cache", target=cfg.target)
    new_decoder(cfg, data)  # the classes the cross-entropy taught: each target's nearest starting prototype
    plain.fit_prototypes(data.pixels, data.prototype_targets)
    assert torch.allclose(refit.prototype_images, plain.prototype_images, atol=1e-6)
    a, b = plain.state_dict(), refit.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "prototype_images")
    with pytest.raises(ConfigError, match="coarse_prototype_ce"):
        new_decoder(dataclasses.replace(cfg, coarse_prototype_ce=0.0, coarse_prototype_refit=True), data)


def test_nearest_prototypes_name_the_subject_not_the_background():
    from seedtok.models.image_decoder import _coarse_head_class

    head = _coarse_head_class()(embed_dim=4, size=8, hidden=8, prototypes=3)
    images = three_subjects()
    pick = head.init_prototypes(images, seed=1, method="kmeans++")
    targets = head.nearest_prototypes(images, pick)
    assert targets.dtype == torch.long and targets.shape == (12,)
    assert (targets[pick] == torch.arange(3)).all()  # each picked image is its own prototype
    own = {0 if int(i) < 10 else int(i): j for j, i in enumerate(pick.tolist())}
    assert targets.tolist() == [own[0]] * 10 + [own[10], own[11]]  # every background of subject 0 alike


def test_prototype_cross_entropy_and_background_loss(micro_data):
    """coarse_prototype_ce / coarse_background_weight: the head's loss is MSE + w_ce * CE(logits of the kept
    embeddings, each target's nearest prototype) + w_bg * MSE(background, the target's border colour)."""
    from seedtok.train.decoder import new_decoder

    cfg = dataclasses.replace(REGRESSED_BACKGROUND, coarse_prototype_ce=0.5, coarse_background_weight=3.0)
    micro_data.prototype_targets = None
    dec = new_decoder(cfg, micro_data)
    try:
        _check_prototype_losses(dec, micro_data)
    finally:
        micro_data.prototype_targets = None  # the fixture is shared


def _check_prototype_losses(dec, micro_data):
    import torch.nn.functional as F

    from seedtok.models.image_decoder import border_colour
    from seedtok.train.decoder import DecoderModel, DecoderTask

    head = dec.pipeline.coarse
    targets = micro_data.prototype_targets
    assert targets is not None and len(targets) == len(micro_data) and 0 <= targets.min() <= targets.max() < 6
    batch = micro_data.batch(list(range(8)))
    torch.testing.assert_close(batch["prototype"], targets[:8])
    task = DecoderTask(dec, 0.0, 3, prototype_ce=0.5, background_weight=3.0)
    task.cond_dropout = 0.5
    seen = []
    forward = head.forward
    head.forward = lambda emb, **k: seen.append(emb) or forward(emb, **k)
    torch.manual_seed(2)
    _, logs = task.loss(DecoderModel(dec), batch)
    kept = (seen[0] != 0).any(1)
    assert 0 < kept.sum() < 8  # some embeddings dropped: the cross-entropy skips them
    image, logits, background, background_logits = forward(seen[0], return_parts=True)
    assert background_logits is None  # the micro head regresses its background
    torch.testing.assert_close(image, forward(seen[0]))
    small = F.interpolate(batch["pixels"], size=(8, 8), mode="area")
    assert logs["prototype_ce"] == pytest.approx(F.cross_entropy(logits[kept], targets[:8][kept]).item(), rel=1e-5)
    assert logs["background_mse"] == pytest.approx(F.mse_loss(background, border_colour(small)).item(), rel=1e-5)
    plain = DecoderTask(dec, 0.0, 3)
    torch.manual_seed(2)
    assert "prototype_ce" not in plain.loss(DecoderModel(dec), batch)[1]  # off unless asked for
    no_targets = micro_data.batch(list(range(8)))
    no_targets.pop("prototype")
    with pytest.raises(ConfigError, match="prototype targets"):
        task.loss(DecoderModel(dec), no_targets)


def test_background_colours_are_a_learned_palette_picked_from_the_borders(micro_data):
    """coarse_background_colours=C: the background is softmax(linear(x) / temperature) @ C learned colours,
    started as k-means++ picks of the targets' border colours; coarse_background_ce teaches each target's
    nearest one (kept embeddings only)."""
    import torch.nn.functional as F

    from seedtok.models.image_decoder import _coarse_head_class
    from seedtok.train.decoder import DecoderModel, DecoderTask, new_decoder

    head = _coarse_head_class()(embed_dim=4, size=8, hidden=8, prototypes=2, background_colours=3)
    images = torch.zeros(9, 3, 8, 8, dtype=torch.uint8)
    images[:, 0] = torch.tensor([10, 10, 10, 200, 200, 200, 90, 90, 90], dtype=torch.uint8)[:, None, None]
    images[:, :, 3:5, 3:5] = 255  # a subject that must not count
    pick = head.init_background_colours(images, seed=0)
    palette = sorted(round(v) for v in (head.background_palette[:, 0] * 127.5 + 127.5).tolist())
    assert palette == [10, 90, 200]  # all three backgrounds, none twice
    targets = head.nearest_background_colours(images, pick)
    assert [int(pick[t]) // 3 for t in targets] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    x = torch.randn(2, 4)
    image, _, background, background_logits = head(x, temperature=0.5, return_parts=True)
    expected = (head.background_logits((x - head.input_mean) / head.input_std) / 0.5).softmax(-1) @ \
        head.background_palette
    torch.testing.assert_close(background, expected)
    assert background_logits.shape == (2, 3) and head.net[-1].out_features == 2  # no regressed colour
    with pytest.raises(ConfigError, match="needs prototypes"):
        _coarse_head_class()(embed_dim=4, size=8, hidden=8, background_colours=3)

    cfg = dataclasses.replace(tiny_decoder_config("micro"), coarse_background_colours=4, coarse_background_ce=2.0)
    micro_data.prototype_targets = micro_data.background_targets = None
    try:
        dec = new_decoder(cfg, micro_data)
        assert micro_data.background_targets is not None and len(micro_data.background_targets) == len(micro_data)
        task = DecoderTask.for_config(dec, cfg)
        assert task.background_ce == 2.0
        task.cond_dropout = 0.5
        batch = micro_data.batch(list(range(8)))
        seen = []
        forward = dec.pipeline.coarse.forward
        dec.pipeline.coarse.forward = lambda emb, **k: seen.append(emb) or forward(emb, **k)
        torch.manual_seed(2)
        _, logs = task.loss(DecoderModel(dec), batch)
        kept = (seen[0] != 0).any(1)
        *_, logits = forward(seen[0], return_parts=True)
        want = F.cross_entropy(logits[kept], batch["background"][kept])
        assert 0 < kept.sum() < 8 and logs["background_ce"] == pytest.approx(want.item(), rel=1e-5)
    finally:
        micro_data.prototype_targets = micro_data.background_targets = None
    with pytest.raises(ConfigError, match="need coarse_prototypes"):
        new_decoder(dataclasses.replace(cfg, coarse_prototypes=0, coarse_background_colours=0), micro_data)
    with pytest.raises(ConfigError, match="needs coarse_background_colours"):
        new_decoder(dataclasses.replace(cfg, coarse_background_colours=0), micro_data)


def test_generation_condition_learns_from_the_tokenizers_code_embeddings(tmp_path, monkeypatch):
    """condition="generation": the embeddings are the tokenizer's decode_embeddings(encode(image)), also
    through the tokenizer's feature cache; the coarse head standardises by them; the run trains."""
    from safetensors.torch import save_file

    from seedtok.config import preset
    from seedtok.data.sources import open_source
    from seedtok.models.tokenizer import SeedTokenizer
    from seedtok.train.data import _cache_key
    from seedtok.train.decoder import DecoderData, _ConfigHolder, new_decoder, train_decoder

    spec = "emoji:train:8"
    tok = SeedTokenizer.from_pretrained("micro").eval()
    samples = open_source(spec)
    images = [samples[i].image for i in range(8)]
    expected = tok.decode_embeddings(tok.encode(images)).half().float()
    vision_class = type(tok.vision)
    backbone_calls = []
    features = vision_class.features
    monkeypatch.setattr(vision_class, "features", lambda self, x: backbone_calls.append(len(x)) or features(self, x))
    data = DecoderData(preset("micro"), samples, spec, 16, cache_dir=tmp_path / "a", progress=False, tokenizer=tok)
    assert backbone_calls == [8]  # one pass gives the teacher and the codes
    torch.testing.assert_close(data.batch(list(range(8)))["embeds"], expected, rtol=2e-3, atol=2e-3)
    assert not torch.allclose(data.embeds.float(), data.teacher.float())
    generation_cache, = (tmp_path / "a").glob("generation-*.safetensors")
    generation_cache.unlink()  # the pixels' cache stays: the codes then get their own pass
    again = DecoderData(preset("micro"), samples, spec, 16, cache_dir=tmp_path / "a", progress=False, tokenizer=tok)
    assert backbone_calls == [8, 8] and generation_cache.is_file()
    torch.testing.assert_close(again.embeds, data.embeds)
    dec = new_decoder(tiny_decoder_config("micro"), data)
    torch.testing.assert_close(dec.pipeline.coarse.input_mean, data.embeds.float().mean(0))
    targets = torch.nn.functional.interpolate(data.pixels.float() / 127.5 - 1, size=(8, 8), mode="area")
    for proto in dec.pipeline.coarse.prototype_images:  # the prototypes start as training targets
        assert (targets - proto[:3]).abs().amax(dim=(1, 2, 3)).min() < 1e-6
    # from the tokenizer's feature cache (its backbone output) when there is one
    with torch.no_grad():
        feats = tok.vision.features(tok.preprocess(images)).half()
    key = _cache_key(_ConfigHolder(preset("micro")), spec, "features")
    (tmp_path / "b").mkdir()
    save_file({"features": feats}, str(tmp_path / "b" / f"features-{key}.safetensors"))
    cached = DecoderData(preset("micro"), samples, spec, 16, cache_dir=tmp_path / "b", progress=False, tokenizer=tok)
    torch.testing.assert_close(cached.embeds.float(), expected, rtol=2e-3, atol=2e-3)
    (tmp_path / "run.json").write_text(json.dumps({"model": "micro", "decoder": {"condition": "generation"},
                                                   "train": {"steps": 2, "data": spec}}))
    assert train_decoder(str(tmp_path / "run.json"), out=tmp_path / "run", progress=False).steps == 2
    (tmp_path / "bad.json").write_text(json.dumps({"model": "micro", "decoder": {"condition": "codes"}}))
    with pytest.raises(ConfigError, match="condition"):
        train_decoder(str(tmp_path / "bad.json"), out=tmp_path / "bad", progress=False)


def test_text_prior_adds_weighted_caption_log_probs_to_the_prototype_choice(tmp_path):
    """``text_prior``: the head's log-probabilities + weight x log-softmax(class_scores / temperature)."""
    cfg = dataclasses.replace(REGRESSED_BACKGROUND, coarse_temperature=0.5, text_prior="emoji-world",
                              text_prior_weight=2.0, text_prior_temperature=0.1)
    dec = TinyDecoder.random(cfg)
    head, pipe = dec.pipeline.coarse, dec.pipeline
    k = head.config.prototypes
    emb = embeds(3)
    scores = torch.rand(3, k, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        out = head.net((emb - head.input_mean) / head.input_std)
        logits = out[:, :k].log_softmax(-1) + 2.0 * (scores / 0.1).log_softmax(-1)
        mix = torch.einsum("bk,kchw->bchw", (logits / 0.5).softmax(-1), head.prototype_images)
        alpha = mix[:, 3:].sigmoid()
        expected = alpha * mix[:, :3] + (1 - alpha) * torch.tanh(out[:, k:])[:, :, None, None]
        torch.testing.assert_close(pipe.coarse_latents(emb, 8, 8, scores), pipe.upsample_coarse(expected, 8, 8))
        plain = pipe.coarse_latents(emb, 8, 8)
        assert (pipe.coarse_latents(emb, 8, 8, scores) - plain).abs().max() > 1e-3
        # equal scores say nothing: the head's own choice
        torch.testing.assert_close(pipe.coarse_latents(emb, 8, 8, torch.zeros(3, k)), plain)
        with pytest.raises(DecodeInputError, match=f"class_scores must be \\[3, {k}\\]"):
            pipe.coarse_latents(emb, 8, 8, scores[:, :2])
    # through decode, per image and batch-independent; weight 0 turns it off; the settings are saved
    a = dec.decode(emb, seed=0, class_scores=scores, output_type="np")
    np.testing.assert_allclose(dec.decode(emb, seed=0, class_scores=scores, batch_size=1, output_type="np"), a,
                               atol=1e-5)
    assert np.abs(a - dec.decode(emb, seed=0, output_type="np")).max() > 1e-3
    dec.save_pretrained(tmp_path / "dec")
    loaded = TinyDecoder.from_pretrained(tmp_path / "dec")
    assert (loaded.pipeline.config.text_prior, loaded.pipeline.config.text_prior_weight,
            loaded.pipeline.config.text_prior_temperature) == ("emoji-world", 2.0, 0.1)
    assert loaded.prior_captions() is not None and loaded.prior_captions(0.0) is None
    np.testing.assert_allclose(loaded.decode(emb, seed=0, class_scores=scores, text_prior_weight=0.0,
                                             output_type="np"), dec.decode(emb, seed=0, output_type="np"), atol=1e-5)
    loaded.pipeline.register_to_config(text_prior_weight=0.0)
    assert loaded.prior_captions() is None
    np.testing.assert_allclose(loaded.decode(emb, seed=0, class_scores=scores, output_type="np"),
                               dec.decode(emb, seed=0, output_type="np"), atol=1e-5)
    with pytest.raises(ConfigError, match="unknown text_prior 'words'"):
        TinyDecoder.random(dataclasses.replace(cfg, text_prior="words"))


def test_text_prior_background_adds_each_named_colours_log_prob_to_its_nearest_learned_colours(monkeypatch):
    """``text_prior_background``: the background softmax's log-probabilities + weight x
    log-softmax(background_scores / temperature), each learned colour taking its nearest named colour's term."""
    from seedtok.models import image_decoder

    named = ((255, 0, 0), (0, 0, 255))  # caption column 0: red backgrounds, column 1: blue
    monkeypatch.setitem(image_decoder.TEXT_PRIOR_COLOURS, "emoji-world", lambda: named)
    cfg = dataclasses.replace(tiny_decoder_config("micro"), coarse_temperature=0.5, text_prior="emoji-world",
                              text_prior_weight=2.0, text_prior_temperature=0.1, text_prior_background=True)
    dec = TinyDecoder.random(cfg)
    head, pipe = dec.pipeline.coarse, dec.pipeline
    with torch.no_grad():  # four learned colours: reddish, blue, dark red, grey-blue
        head.background_palette.copy_(torch.tensor([[0.8, -0.9, -0.9], [-1.0, -1.0, 1.0], [0.2, -1.0, -1.0],
                                                    [-0.5, -0.4, 0.3]]))
    emb = embeds(3)
    scores = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]])
    with torch.no_grad():
        x = (emb - head.input_mean) / head.input_std
        k = head.config.prototypes
        weights = (head.net(x)[:, :k] / 0.5).softmax(-1)
        mix = torch.einsum("bk,kchw->bchw", weights, head.prototype_images)
        alpha = mix[:, 3:].sigmoid()
        prior = 2.0 * (scores / 0.1).log_softmax(-1)[:, [0, 1, 0, 1]]
        colour = ((head.background_logits(x).log_softmax(-1) + prior) / 0.5).softmax(-1) @ head.background_palette
        expected = alpha * mix[:, :3] + (1 - alpha) * colour[:, :, None, None]
        got = pipe.coarse_latents(emb, 8, 8, background_scores=scores)
        torch.testing.assert_close(got, pipe.upsample_coarse(expected, 8, 8))
        plain = pipe.coarse_latents(emb, 8, 8)
        assert (got - plain).abs().max() > 1e-3
        torch.testing.assert_close(pipe.coarse_latents(emb, 8, 8, background_scores=torch.zeros(3, 2)), plain)
        # weight 0 turns it off with the class prior
        torch.testing.assert_close(pipe.coarse_latents(emb, 8, 8, text_prior_weight=0.0, background_scores=scores),
                                   plain)
        with pytest.raises(DecodeInputError, match="background_scores must be \\[3, 2\\]"):
            pipe.coarse_latents(emb, 8, 8, background_scores=scores[:, :1])
    # through decode: per image and batch-independent
    a = dec.decode(emb, seed=0, background_scores=scores, output_type="np")
    np.testing.assert_allclose(dec.decode(emb, seed=0, background_scores=scores, batch_size=1, output_type="np"), a,
                               atol=1e-5)
    assert dec.prior_names_backgrounds() and not dec.prior_names_backgrounds(0.0)
    assert not TinyDecoder.random(dataclasses.replace(cfg, text_prior_background=False)).prior_names_backgrounds()
    with pytest.raises(ConfigError, match="text_prior_background needs"):
        TinyDecoder.random(dataclasses.replace(cfg, coarse_background_colours=0, coarse_background_ce=0.0))
    with pytest.raises(ConfigError, match="text_prior_background needs"):
        TinyDecoder.random(dataclasses.replace(cfg, text_prior=""))


def test_tiny_decoder_text_prior_names_one_class_per_prototype():
    from seedtok.data.emoji import PALETTE, caption_for, pool
    from seedtok.models.image_decoder import TEXT_PRIORS

    cfg = tiny_decoder_config("tiny")
    captions = TEXT_PRIORS[cfg.text_prior]()
    assert len(captions) == cfg.coarse_prototypes == len(pool())  # prototype k is emoji k ("emoji" init)
    assert captions[5] == tuple(caption_for(pool()[5].name, c) for c in PALETTE)
    # column j of every class's captions is its scene on background colour j
    from seedtok.models.image_decoder import TEXT_PRIOR_COLOURS

    assert cfg.text_prior_background and TEXT_PRIOR_COLOURS[cfg.text_prior]() == tuple(PALETTE.values())
