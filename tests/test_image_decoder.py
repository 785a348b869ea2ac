"""Image decoders (SPEC §2.7) on tiny random diffusers pipelines, saved to a folder and loaded back through the
same ``from_pretrained`` users take. Each decode runs 2-3 steps at 16x16 pixels."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from seedtok.errors import CheckpointError, ConfigError
from seedtok.models.image_decoder import (DecodeInputError, Seed1SDDecoder, Seed2UnCLIPDecoder,
                                          build_image_decoder, build_random_pipeline)

pytest.importorskip("diffusers")

D = 16  # the tiny unCLIP image-embedding width
STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: threads only add overhead


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    build_random_pipeline("seed2", root / "seed2")
    build_random_pipeline("seed1", root / "seed1")
    return root


@pytest.fixture(scope="module")
def seed2(folders):
    return Seed2UnCLIPDecoder.from_pretrained(folders / "seed2", num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def seed1(folders):
    return Seed1SDDecoder.from_pretrained(folders / "seed1", num_inference_steps=STEPS)


def embeds2(n, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2


def embeds1(n, seed=0):
    return torch.randn(n, 77, 32, generator=torch.Generator().manual_seed(seed))


def unet_spy(monkeypatch, decoder):
    """Record the batch size and class labels of every UNet call."""
    calls = []
    unet = decoder.pipeline.unet
    forward = unet.forward

    def spy(sample, timestep, encoder_hidden_states, *args, **kwargs):
        calls.append({"batch": sample.shape[0], "class_labels": kwargs.get("class_labels"),
                      "context": encoder_hidden_states.detach().clone()})
        return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", spy)
    return calls


# ----------------------------------------------------------------------------------------------- SEED-2
def test_seed2_loads_through_from_pretrained_and_decodes_a_batch(seed2):
    assert type(seed2.pipeline).__name__ == "SeedStableUnCLIPImg2ImgPipeline"
    assert seed2.pipeline.image_encoder is None  # decoding embeddings needs no CLIP image encoder
    assert (seed2.guidance_scale, seed2.noise_level, seed2.num_inference_steps) == (10.0, 0, STEPS)
    assert seed2.size == (16, 16) == (seed2.native_size,) * 2  # the UNet's own size (768 for SD 2.1 unCLIP)
    images = seed2.decode(embeds2(3), seed=[1, 2, 3], height=16, width=24)
    assert len(images) == 3 and all(isinstance(im, Image.Image) for im in images)
    assert {im.size for im in images} == {(24, 16)} and {im.mode for im in images} == {"RGB"}
    assert seed2.decode(embeds2(1)[0], seed=0)[0].size == (16, 16)  # one embedding without the batch axis


def test_seed2_batch_equals_one_at_a_time(seed2):
    emb, seeds = embeds2(3), [11, 12, 13]
    batched = seed2.decode(emb, seed=seeds, output_type="np")
    alone = np.concatenate([seed2.decode(emb[i:i + 1], seed=[s], output_type="np") for i, s in enumerate(seeds)])
    chunked = seed2.decode(emb, seed=seeds, output_type="np", batch_size=2)
    assert batched.shape == (3, 16, 16, 3)
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    np.testing.assert_allclose(batched, chunked, atol=1e-5)
    assert np.abs(batched[0] - batched[1]).max() > 1e-2  # different embeddings/seeds: different images
    # an int seed starts every image from that seed
    np.testing.assert_array_equal(seed2.decode(emb, seed=5, output_type="np"),
                                  seed2.decode(emb, seed=[5, 5, 5], output_type="np"))
    # the PIL path agrees with the float path up to uint8 rounding
    pil = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in seed2.decode(emb, seed=seeds)])
    assert np.abs(pil - batched).max() <= 1 / 255 + 1e-6


def test_seed2_default_negative_is_the_stock_pipeline(seed2):
    """The default unconditional input is the stock pipeline's ``zeros_like`` conditioning, with the empty prompt
    on both branches: the stock ``StableUnCLIPImg2ImgPipeline`` (prompt "" per image) gives the same pixels."""
    from diffusers import StableUnCLIPImg2ImgPipeline

    stock = build_random_pipeline("seed2", with_image_encoder=True)  # same seed: the same weights
    stock.image_normalizer.load_state_dict(seed2.pipeline.image_normalizer.state_dict())
    assert isinstance(stock, StableUnCLIPImg2ImgPipeline) and type(stock) is StableUnCLIPImg2ImgPipeline
    emb, seeds = embeds2(2), [5, 6]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    latents = torch.cat([torch.randn(1, 4, 8, 8, generator=g) for g in gens])  # the decoder's first draw
    expected = stock(image_embeds=emb, prompt=["", ""], num_inference_steps=STEPS, generator=gens,
                     latents=latents, output_type="np").images
    got = seed2.decode(emb, seed=seeds, output_type="np")
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' Euler: numpy 2 copy keyword
def test_seed2_scales_given_latents_like_the_scheduler_wants(folders):
    """The stock unCLIP ``__call__`` skips ``init_noise_sigma`` for given latents; the decoder applies it, so a
    sigma-scaled scheduler (Euler) starts from noise of the right size."""
    from diffusers import EulerDiscreteScheduler, StableUnCLIPImg2ImgPipeline

    decoder = Seed2UnCLIPDecoder.from_pretrained(folders / "seed2", num_inference_steps=STEPS)
    decoder.pipeline.scheduler = EulerDiscreteScheduler.from_config(decoder.pipeline.scheduler.config)
    stock = StableUnCLIPImg2ImgPipeline(**{**decoder.pipeline.components,
                                           "image_encoder": build_random_pipeline("seed2", with_image_encoder=True)
                                           .image_encoder})
    stock.set_progress_bar_config(disable=True)
    emb, latents = embeds2(1), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    got = decoder.decode(emb, latents=latents, seed=1, output_type="np")
    stock.scheduler.set_timesteps(STEPS)
    sigma = stock.scheduler.init_noise_sigma
    assert sigma > 2  # 3.1 at 3 'leading' steps
    expected = stock(image_embeds=emb, prompt="", num_inference_steps=STEPS, latents=latents * sigma,
                     generator=[torch.Generator().manual_seed(1)], output_type="np").images
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_seed2_negative_embedding(seed2, monkeypatch):
    emb, seeds = embeds2(2), [3, 4]
    default = seed2.decode(emb, seed=seeds, output_type="np")
    negative = embeds2(1, seed=9)
    calls = unet_spy(monkeypatch, seed2)
    given = seed2.decode(emb, seed=seeds, negative_embeddings=negative, output_type="np")
    assert np.abs(given - default).max() > 1e-3  # a given negative changes the images
    # it is broadcast from [1, D] and enters the unconditional half of the UNet's class labels, noised and
    # tagged with the noise level like the positive (the reference's patch)
    labels = calls[0]["class_labels"]
    assert calls[0]["batch"] == 4 and labels.shape == (4, 2 * D)
    uncond, cond = labels[:2], labels[2:]
    torch.testing.assert_close(uncond[:, D:], cond[:, D:])  # same noise-level code
    torch.testing.assert_close(uncond[:, :D], negative.expand(2, D), atol=0.05, rtol=0)  # level 0: ~no noise
    torch.testing.assert_close(cond[:, :D], emb, atol=0.05, rtol=0)
    monkeypatch.undo()
    repeated = seed2.decode(emb, seed=seeds, negative_embeddings=negative.expand(2, D), output_type="np")
    np.testing.assert_allclose(repeated, given, atol=1e-6)
    # an explicit zero *embedding* is not the default: it is normalised and tagged like any negative
    zeros = seed2.decode(emb, seed=seeds, negative_embeddings=torch.zeros(1, D), output_type="np")
    assert np.abs(zeros - default).max() > 1e-3


def test_seed2_default_unconditional_labels_are_zero(seed2, monkeypatch):
    calls = unet_spy(monkeypatch, seed2)
    seed2.decode(embeds2(2), seed=0, output_type="np")
    labels = calls[0]["class_labels"]
    assert torch.count_nonzero(labels[:2]) == 0 and torch.count_nonzero(labels[2:]) > 0
    # the empty prompt on both branches
    empty, _ = seed2.pipeline.encode_prompt("", seed2.device, 1, False)
    torch.testing.assert_close(calls[0]["context"], empty.expand(4, -1, -1))


def test_seed2_without_guidance(seed2, monkeypatch):
    emb = embeds2(2)
    calls = unet_spy(monkeypatch, seed2)
    plain = seed2.decode(emb, seed=[1, 2], guidance_scale=1.0, output_type="np")
    assert [c["batch"] for c in calls] == [2] * STEPS  # no unconditional branch
    with_negative = seed2.decode(emb, seed=[1, 2], guidance_scale=1.0, negative_embeddings=embeds2(1, seed=4),
                                 output_type="np")
    np.testing.assert_allclose(with_negative, plain, atol=1e-6)  # a negative means nothing without guidance
    guided = seed2.decode(emb, seed=[1, 2], output_type="np")
    assert np.abs(guided - plain).max() > 1e-3
    assert len(seed2.decode(emb, seed=[1, 2], guidance_scale=1.0)) == 2


def test_seed2_fixed_latents_are_reproducible(seed2):
    emb = embeds2(2)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))  # one latent for all, as
    first = seed2.decode(emb, latents=latents, seed=1, output_type="np")            # the reference decoder
    again = seed2.decode(emb, latents=latents, seed=1, output_type="np")
    np.testing.assert_array_equal(first, again)
    # the latents, not the seed, fix the start: another seed only changes unCLIP's (tiny, level-0) embedding
    # noise; another latent changes the image
    other_seed = seed2.decode(emb, latents=latents, seed=2, output_type="np")
    other_latents = seed2.decode(emb, latents=-latents, seed=1, output_type="np")
    assert np.abs(other_seed - first).max() < np.abs(other_latents - first).max()
    # [B, ...] latents equal to the broadcast [1, ...] one
    np.testing.assert_array_equal(seed2.decode(emb, latents=latents.expand(2, -1, -1, -1), seed=1,
                                               output_type="np"), first)
    # and a seed alone is reproducible too
    np.testing.assert_array_equal(seed2.decode(emb, seed=3, output_type="np"), seed2.decode(emb, seed=3,
                                                                                         output_type="np"))


def test_seed2_noise_level_is_passed(seed2, monkeypatch):
    calls = unet_spy(monkeypatch, seed2)
    seed2.decode(embeds2(1), seed=0, noise_level=500, negative_embeddings=embeds2(1, seed=1), output_type="np")
    uncond, noised = calls[-1]["class_labels"]
    torch.testing.assert_close(uncond[D:], noised[D:])  # a given negative is noised at the same level
    seed2.decode(embeds2(1), seed=0, output_type="np")
    clean = calls[-1]["class_labels"][1]
    assert (noised[D:] - clean[D:]).abs().max() > 0.1  # another noise-level code
    assert (noised[:D] - clean[:D]).abs().max() > 0.1  # and a noised embedding


# ----------------------------------------------------------------------------------------------- SEED-1
def test_seed1_loads_with_plms_and_decodes_a_batch(seed1, folders):
    from diffusers import DDIMScheduler, PNDMScheduler

    assert isinstance(seed1.pipeline.scheduler, PNDMScheduler)  # the folder holds DDIM: swapped for PLMS
    assert seed1.pipeline.scheduler.config.skip_prk_steps
    assert (seed1.guidance_scale, seed1.num_inference_steps, seed1.size) == (7.5, STEPS, (16, 16))
    assert seed1.pipeline.safety_checker is None
    kept = Seed1SDDecoder.from_pretrained(folders / "seed1", scheduler=None)
    assert isinstance(kept.pipeline.scheduler, DDIMScheduler) and kept.num_inference_steps == 50
    images = seed1.decode(embeds1(2), seed=[1, 2], height=24, width=16)
    assert len(images) == 2 and {im.size for im in images} == {(16, 24)}


def test_seed1_batch_equals_one_at_a_time(seed1):
    emb, seeds = embeds1(3), [21, 22, 23]
    batched = seed1.decode(emb, seed=seeds, output_type="np")
    alone = np.concatenate([seed1.decode(emb[i], seed=[s], output_type="np") for i, s in enumerate(seeds)])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    np.testing.assert_allclose(seed1.decode(emb, seed=seeds, batch_size=1, output_type="np"), batched, atol=1e-5)
    assert np.abs(batched[0] - batched[2]).max() > 1e-2


def test_seed1_unconditional_is_the_encoding_of_empty_text(seed1, folders, monkeypatch):
    """Equal to the stock StableDiffusionPipeline given, by hand, text_encoder(tokenizer("")) as the negative."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    stock = StableDiffusionPipeline.from_pretrained(folders / "seed1", safety_checker=None, feature_extractor=None,
                                                    requires_safety_checker=False)
    stock.scheduler = PNDMScheduler.from_config(stock.scheduler.config, skip_prk_steps=True)
    stock.set_progress_bar_config(disable=True)
    ids = stock.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0] == 0 and ids[0, 1] == 1  # <|startoftext|> <|endoftext|> pad...
    with torch.no_grad():
        empty = stock.text_encoder(ids)[0]
    emb, seeds = embeds1(2), [1, 2]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    latents = torch.cat([torch.randn(1, 4, 8, 8, generator=g) for g in gens])
    expected = stock(prompt_embeds=emb, negative_prompt_embeds=empty.expand(2, -1, -1), guidance_scale=7.5,
                     num_inference_steps=STEPS, latents=latents, output_type="np").images
    calls = unet_spy(monkeypatch, seed1)
    got = seed1.decode(emb, seed=seeds, output_type="np")
    np.testing.assert_allclose(got, expected, atol=1e-5)
    torch.testing.assert_close(calls[0]["context"][:2], empty.expand(2, -1, -1))
    # a given negative replaces it (so the comparison above could fail)
    other = seed1.decode(emb, seed=seeds, negative_embeddings=torch.zeros(1, 77, 32), output_type="np")
    assert np.abs(other - got).max() > 1e-3


def test_seed1_without_guidance_and_fixed_latents(seed1, monkeypatch):
    emb = embeds1(2)
    calls = unet_spy(monkeypatch, seed1)
    seed1.decode(emb, seed=0, guidance_scale=1.0, output_type="np")
    assert {c["batch"] for c in calls} == {2}
    latents = torch.randn(2, 4, 8, 8)
    first = seed1.decode(emb, latents=latents, output_type="np")  # PLMS draws nothing else: no seed needed
    np.testing.assert_array_equal(first, seed1.decode(emb, latents=latents, output_type="np"))
    assert np.abs(first - seed1.decode(emb, latents=latents * 0.5, output_type="np")).max() > 1e-3


# ------------------------------------------------------------------------------------- common interface
def test_build_image_decoder_and_errors(folders, seed2):
    decoder = build_image_decoder("seed2", folders / "seed2", guidance_scale=3.0, noise_level=10)
    assert isinstance(decoder, Seed2UnCLIPDecoder) and decoder.guidance_scale == 3.0 and decoder.noise_level == 10
    assert isinstance(build_image_decoder("seed1", folders / "seed1"), Seed1SDDecoder)
    with pytest.raises(ConfigError):
        build_image_decoder("seed3", folders / "seed2")
    with pytest.raises(CheckpointError):
        build_image_decoder("seed2", folders / "missing", local_files_only=True)
    with pytest.raises(DecodeInputError):
        seed2.decode(torch.randn(2, D + 1))  # wrong width
    with pytest.raises(DecodeInputError):
        seed2.decode(torch.randn(2, D), seed=[1, 2, 3])  # one seed per image
    with pytest.raises(DecodeInputError):
        seed2.decode(torch.randn(2, D), negative_embeddings=torch.randn(3, D))
    with pytest.raises(DecodeInputError):
        seed2.decode(torch.randn(2, D), latents=torch.randn(2, 4, 4, 4))  # not 16x16's latent size
    with pytest.raises(DecodeInputError):
        seed2.decode(torch.full((1, D), float("nan")))
    assert seed2.decode(torch.randn(0, D)) == []
    assert seed2.decode(torch.randn(0, D), output_type="np").shape == (0, 16, 16, 3)


def test_save_pretrained_round_trip(seed2, tmp_path):
    seed2.save_pretrained(tmp_path / "dec")
    index = json.loads((tmp_path / "dec" / "model_index.json").read_text())
    assert index["_class_name"] == "StableUnCLIPImg2ImgPipeline"  # loadable by stock diffusers
    again = Seed2UnCLIPDecoder.from_pretrained(tmp_path / "dec", num_inference_steps=STEPS)
    emb = embeds2(1)
    np.testing.assert_array_equal(again.decode(emb, seed=4, output_type="np"),
                                  seed2.decode(emb, seed=4, output_type="np"))
