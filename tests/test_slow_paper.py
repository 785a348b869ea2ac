"""Paper-size checks (1.15B parameters): run with `make test-slow`."""

import pytest
import torch

from seedtok import SeedTokenizer, preset
from seedtok.official import to_official_state_dict

pytestmark = pytest.mark.slow


def test_seed2_official_files_round_trip_at_paper_size(tmp_path, photos):
    source = SeedTokenizer(preset("seed2")).eval()
    state = to_official_state_dict(source)
    vit = {k[len("visual_encoder."):]: state.pop(k) for k in list(state) if k.startswith("visual_encoder.")}
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    torch.save(state, tmp_path / "seed_quantizer.pt")
    del vit, state
    loaded = SeedTokenizer.from_official(tmp_path / "seed_quantizer.pt", tmp_path / "eva_vit_g.pth")
    assert loaded.load_report.version == "seed2" and loaded.load_report.num_missing == 0
    assert loaded.load_report.loaded == 881 - 1  # all but the recomputed position_ids buffer
    ids = source.encode(photos[:2])
    assert torch.equal(loaded.encode(photos[:2]), ids)
    torch.testing.assert_close(loaded.decode_embeddings(ids), source.decode_embeddings(ids), rtol=0, atol=0)
    assert loaded.decode_embeddings(ids).shape == (2, 1024)
