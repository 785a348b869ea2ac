import dataclasses

import pytest
import torch

from seedtok.config import QuantizerConfig, preset
from seedtok.models.quantizer import VectorQuantizer, vq_loss


def _quantizer(codebook):
    q = VectorQuantizer(QuantizerConfig(codebook_size=len(codebook), code_dim=2, beta=0.25), input_width=4)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor(codebook))
    return q


def test_lookup_is_nearest_by_squared_l2_without_normalisation():
    # Cosine would pick code 2 for [4, 4] (same direction as [1, 1]); squared L2 picks [3, 3.5].
    q = _quantizer([[0.0, 0.0], [1.0, 1.0], [3.0, 3.5], [-1.0, 2.0]])
    z = torch.tensor([[[4.0, 4.0], [0.9, 1.2], [-0.2, 0.1], [-0.8, 1.7]]])
    assert q.lookup(z).tolist() == [[2, 1, 0, 3]]


def test_lookup_agrees_with_brute_force_on_random_data():
    torch.manual_seed(0)
    q = VectorQuantizer(QuantizerConfig(codebook_size=512, code_dim=8), input_width=16)
    with torch.no_grad():
        q.embedding.weight.normal_()
    z = torch.randn(3, 32, 8)
    brute = ((z[..., None, :].double() - q.embedding.weight.double()) ** 2).sum(-1).argmin(-1)
    assert torch.equal(q.lookup(z), brute)


def test_codebook_init_is_uniform_over_plus_minus_one_over_k():
    q = VectorQuantizer(QuantizerConfig(codebook_size=8192, code_dim=32), input_width=8)
    w = q.embedding.weight
    assert w.abs().max() <= 1 / 8192 and w.std() > 0.5 / 8192 / 3 ** 0.5


def test_loss_is_taming_legacy_with_beta_on_the_codebook_term():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    z = torch.tensor([[0.9, 1.2], [-0.2, 0.1]], requires_grad=True)
    z_q = codebook[torch.tensor([1, 0])]
    loss = vq_loss(z, z_q, beta=0.25)
    # diffs (z_q - z): [0.1, -0.2], [0.2, -0.1] -> mean square 0.025; (1 + 0.25) * 0.025
    assert loss.item() == pytest.approx(0.03125, abs=1e-7)
    loss.backward()
    # commitment term mean((sg(z_q) - z)^2) carries weight 1 to z; beta = 0.25 lands on the codebook
    torch.testing.assert_close(z.grad, 2 * (z - z_q).detach() / 4)
    expected = torch.zeros(2, 2)
    expected[1] = 0.25 * 2 * (z_q[0] - z[0]).detach() / 4
    expected[0] = 0.25 * 2 * (z_q[1] - z[1]).detach() / 4
    torch.testing.assert_close(codebook.grad, expected)


def test_forward_straight_through_and_values():
    torch.manual_seed(0)
    q = VectorQuantizer(QuantizerConfig(codebook_size=16, code_dim=4), input_width=8)
    h = torch.randn(2, 32, 8, requires_grad=True)
    out = q(h)
    assert out.ids.shape == (2, 32) and out.ids.dtype == torch.long
    torch.testing.assert_close(out.codes, q.embedding(out.ids))  # forward value = codebook vectors
    # gradient flows straight through: d(sum codes)/d(latents) = 1
    grad, = torch.autograd.grad(out.codes.sum(), out.latents, retain_graph=True)
    assert torch.equal(grad, torch.ones_like(grad))
    expected = torch.mean((out.codes.detach() - out.latents) ** 2) * 1.25
    torch.testing.assert_close(out.loss, expected)


def test_kmeans_init_places_codes_on_the_clusters():
    torch.manual_seed(0)
    q = VectorQuantizer(QuantizerConfig(codebook_size=4, code_dim=2, kmeans_init=True), input_width=2)
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    latents = (centres[:, None] + 0.1 * torch.randn(4, 50, 2)).reshape(-1, 2)
    q.kmeans_init_(latents)
    assert bool(q.initialized)
    found = q.embedding.weight.detach()
    assert torch.cdist(centres, found).min(dim=1).values.max() < 0.2  # every cluster has a code on it
    # in eval mode nothing changes; off by default in the paper presets
    from seedtok import preset
    assert not preset("seed2").quantizer.kmeans_init and not preset("seed2").quantizer.dead_code_restart


def test_dead_codes_move_onto_batch_latents():
    torch.manual_seed(0)
    cfg = QuantizerConfig(codebook_size=8, code_dim=2, dead_code_restart=True, usage_decay=0.5,
                          dead_code_threshold=0.05)
    q = VectorQuantizer(cfg, input_width=2)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0]] + [[100.0 + i, 100.0] for i in range(7)]))
    latents = torch.randn(64, 2) * 0.01
    ids = q.lookup(latents)
    assert ids.unique().tolist() == [0]
    for _ in range(4):
        moved = q.restart_dead_codes_(latents, ids)
    w = q.embedding.weight.detach()
    assert (w[1:].abs() < 1).all(), "dead codes should now sit on batch latents"
    assert moved >= 0 and q.usage.shape == (8,)
    assert "usage" in q.state_dict()  # carried by checkpoints and resumed runs


def test_position_dither_spreads_alike_positions_over_codes_and_is_deterministic():
    torch.manual_seed(0)
    hidden = torch.randn(3, 1, 8).expand(3, 32, 8)  # every position of an image carries the same embedding
    plain = VectorQuantizer(QuantizerConfig(codebook_size=64, code_dim=4), input_width=8)
    with torch.no_grad():
        plain.embedding.weight.normal_()
    assert "dither" not in plain.state_dict()  # off: the paper form, nothing extra in checkpoints
    assert all(len(row.unique()) == 1 for row in plain(hidden).ids)

    dithered = VectorQuantizer(QuantizerConfig(codebook_size=64, code_dim=4, position_dither=1.0), input_width=8)
    dithered.load_state_dict(plain.state_dict(), strict=False)
    out = dithered(hidden)
    assert all(len(row.unique()) > 4 for row in out.ids)
    # the offset is the latent's RMS times a fixed per-position vector, so an image's ids do not depend on
    # the rest of the batch, and a second quantizer from the same seed draws the same offsets
    z = plain.encode_task_layer(hidden)
    rms = z.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(out.latents, z + rms * dithered.dither)
    assert torch.equal(dithered(hidden[:1]).ids, out.ids[:1])
    again = VectorQuantizer(QuantizerConfig(codebook_size=64, code_dim=4, position_dither=1.0), input_width=8)
    assert torch.equal(again.dither, dithered.dither) and "dither" in dithered.state_dict()
    assert preset_dither("seed2") == 0.0 and preset_dither("seed1") == 0.0


def preset_dither(name):
    from seedtok import preset
    return preset(name).quantizer.position_dither


def test_position_rotation_gives_each_position_its_own_rotated_codebook():
    torch.manual_seed(0)
    hidden = torch.randn(3, 1, 8).expand(3, 32, 8)  # every position of an image carries the same embedding
    cfg = QuantizerConfig(codebook_size=64, code_dim=4, position_rotation=True)
    rotated = VectorQuantizer(cfg, input_width=8)
    with torch.no_grad():
        rotated.embedding.weight.normal_()
    plain = VectorQuantizer(QuantizerConfig(codebook_size=64, code_dim=4), input_width=8)
    plain.load_state_dict(rotated.state_dict())  # the rotations are not in checkpoints: rebuilt from the seed
    assert all(len(row.unique()) == 1 for row in plain(hidden).ids)
    out = rotated(hidden)
    assert all(len(row.unique()) > 4 for row in out.ids)  # the alike positions fall into different cells

    rot = rotated.rotation
    assert rot.shape == (32, 4, 4) and rot.dtype == torch.float32
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(4).expand(32, 4, 4), atol=1e-6, rtol=0)
    assert not torch.allclose(rot[0], rot[1])
    # position k looks z R_k up, and hands the de-tokenizer e R_k^T: codes_for(ids) is that, and the
    # straight-through codes equal it in value
    z = plain.encode_task_layer(hidden)
    torch.testing.assert_close(out.latents, torch.einsum("bnd,nde->bne", z, rot))
    expected = torch.einsum("bne,nde->bnd", rotated.embedding(out.ids), rot)
    torch.testing.assert_close(rotated.codes_for(out.ids), expected)
    torch.testing.assert_close(out.codes, expected, atol=1e-6, rtol=0)
    # ids do not depend on the batch; the same seed draws the same rotations, another seed others
    assert torch.equal(rotated(hidden[:1]).ids, out.ids[:1])
    assert torch.equal(VectorQuantizer(cfg, input_width=8).rotation, rot)
    other = dataclasses.replace(cfg, rotation_seed=1)
    assert not torch.allclose(VectorQuantizer(other, input_width=8).rotation, rot)
    assert preset("seed2").quantizer.position_rotation is False
    assert preset("seed1").quantizer.position_rotation is False
