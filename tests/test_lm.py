"""SeedLM on tiny random LLaMA and OPT models with a small offline word-level tokenizer (no network)."""

import json
import warnings

import pytest
import torch

from seedtok.config import LMConfig
from seedtok.errors import ConfigError, IdsError
from seedtok.models.lm import (IGNORE, IMG_BEGIN, IMG_END, IMG_TOKEN, PROMPT_FORMATS, Image_, SeedLM,
                               extend_vocabulary, lora_target_modules)

WORDS = ("a an the red orange yellow green blue purple pink brown black white gray apple cat dog star on "
         "background what emoji is in image color of yes no there describe . ? : USER ASSISTANT INST [ ] / "
         "hello world language model text").split()
CODES = 64  # the micro image tokenizer's codebook


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_base(kind, folder):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    tok = word_tokenizer()
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                        word_embed_proj_dim=32, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0, dropout=0.0, attention_dropout=0.0)
        model = OPTForCausalLM(cfg)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module", params=["llama", "opt"])
def base(request, tmp_path_factory):
    return request.param, make_base(request.param, tmp_path_factory.mktemp(request.param))


def lm_config(folder, **kw):
    kw = {"base": str(folder), "tokenizer": "micro", "codebook_size": CODES, "lora_r": 4, "lora_alpha": 8,
          "lora_dropout": 0.0, "prompt_format": "vicuna", "max_length": 96, **kw}
    return LMConfig(name="test", **kw)


def perturb(lm, seed=1):
    """Give the adapter non-zero weights (LoRA B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lm.trainable_named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


# ------------------------------------------------------------------------------------------ layout
def test_codebook_row_init_keeps_code_geometry(base):
    _, folder = base
    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(CODES, 8, generator=g)
    lm = SeedLM.build(lm_config(folder), codebook=codebook)
    n = len(word_tokenizer())
    weight = lm.model.get_input_embeddings().weight.detach()
    rows, base_rows = weight[lm.image_offset:lm.image_offset + CODES], weight[:n]
    # pairwise distances between code rows are the codebook's, up to one scale
    ratio = torch.cdist(rows, rows)[~torch.eye(CODES, dtype=torch.bool)] / torch.cdist(codebook, codebook)[
        ~torch.eye(CODES, dtype=torch.bool)]
    assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-3)
    # centred on the base rows' mean, at the base rows' mean spread
    mean = base_rows.mean(0)
    assert torch.allclose(rows.mean(0), mean, atol=1e-5)
    spread = (base_rows - mean).norm(dim=1).mean()
    assert torch.isclose((rows - mean).norm(dim=1).mean(), spread, rtol=1e-4)
    # without a codebook the rows come from transformers' resize: not this layout
    plain = SeedLM.build(lm_config(folder)).model.get_input_embeddings().weight.detach()
    assert not torch.allclose(plain[lm.image_offset:lm.image_offset + CODES], rows)
    with pytest.raises(ConfigError, match="codebook of 5 codes"):
        SeedLM.build(lm_config(folder), codebook=codebook[:5])


def test_caption_row_init_points_codes_at_their_images_words(base):
    _, folder = base
    tok = word_tokenizer()
    # code 0 only on red scenes, code 1 only on blue ones, codes 2-3 everywhere, the rest never used
    ids = torch.tensor([[0, 2, 3], [0, 3, 2], [1, 2, 3], [1, 3, 2]])
    captions = ["a cat on a red background", "a dog on a red background", "a cat on a blue background",
                "a dog on a blue background"]
    codebook = torch.randn(CODES, 8, generator=torch.Generator().manual_seed(3))
    lm = SeedLM.build(lm_config(folder), codebook=codebook, captioned_ids=(ids, captions))
    n = len(tok)
    # the rows the LM trains (peft's trainable-token copies) hold the start, not only the base weight
    weight = lm.model.get_input_embeddings()(torch.arange(lm.image_offset, lm.image_offset + CODES)).detach()
    base_rows = lm.model.get_input_embeddings()(torch.arange(n)).detach()
    red, blue = base_rows[tok.convert_tokens_to_ids("red")], base_rows[tok.convert_tokens_to_ids("blue")]
    mean = base_rows.mean(0)
    # code 0 lies towards "red" and away from "blue", code 1 the other way round
    towards = (red - blue) / (red - blue).norm()
    assert ((weight[0] - mean) @ towards) > 0 > ((weight[1] - mean) @ towards)
    # codes used on every scene carry no direction: they sit at the base rows' mean
    torch.testing.assert_close(weight[2], mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(weight[3], mean, atol=1e-5, rtol=0)
    # codes no image uses keep the codebook start
    from seedtok.models.lm import codebook_rows

    torch.testing.assert_close(weight[4:], codebook_rows(codebook, base_rows)[4:], atol=1e-5, rtol=1e-5)
    # the used directions are scaled to the base rows' mean spread
    spread = (base_rows - mean).norm(dim=1).mean()
    assert torch.isclose((weight[:4] - mean).norm(dim=1).mean(), spread, rtol=1e-4)


def test_token_layout_appended(base):
    _, folder = base
    lm = SeedLM.build(lm_config(folder))
    n = len(word_tokenizer())
    assert (lm.begin_id, lm.end_id, lm.image_offset) == (n, n + 1, n + 2)
    vocab = lm.tokenizer.get_vocab()
    assert vocab[IMG_TOKEN.format(CODES - 1)] == n + 2 + CODES - 1
    assert lm.model.get_input_embeddings().weight.shape[0] >= n + 2 + CODES
    assert lm.tokenizer.convert_tokens_to_ids("<img_00005>") == lm.image_offset + 5


def test_token_layout_seed_llama_shift(tmp_path):
    from transformers import AutoTokenizer

    folder = make_base("llama", tmp_path / "b")
    n = len(word_tokenizer())
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert extend_vocabulary(tok, lm_config(folder, image_id_shift=n)) == n  # codes first, at the shift
    vocab = tok.get_vocab()
    assert vocab[IMG_TOKEN.format(0)] == n and vocab[IMG_BEGIN] == n + CODES and vocab[IMG_END] == n + CODES + 1
    # already present (a released SEED-LLaMA tokenizer): checked, not re-added
    assert extend_vocabulary(tok, lm_config(folder, image_id_shift=n)) == n and len(tok) == n + CODES + 2
    with pytest.raises(ConfigError, match="image_id_shift"):
        extend_vocabulary(tok, lm_config(folder, image_id_shift=n + 1))
    fresh = AutoTokenizer.from_pretrained(str(folder))
    with pytest.raises(ConfigError, match="exactly"):
        extend_vocabulary(fresh, lm_config(folder, image_id_shift=32000))


def test_lora_targets_by_model_names(base):
    kind, folder = base
    from transformers import AutoModelForCausalLM

    names = lora_target_modules(AutoModelForCausalLM.from_pretrained(str(folder)))
    if kind == "llama":
        assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    else:
        assert names == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
    lm = SeedLM.build(lm_config(folder))
    stored = list(lm.stored_state_dict())
    assert all(any(f".{t}." in k for t in names) for k in stored if "lora_" in k)
    deltas = [k for k in stored if "trainable_tokens_delta" in k]
    assert deltas, "new rows must train"
    for k in deltas:  # only the new rows: <img>, </img> and the codes
        assert lm.stored_state_dict()[k].shape[0] == CODES + 2
    # nothing of the base (full embedding, lm_head, layers) is stored
    assert all("lora_" in k or "trainable_tokens_delta" in k for k in stored)


# ------------------------------------------------------------------------------------------ prompts and masks
def test_prompt_formats_text():
    assert PROMPT_FORMATS["vicuna"].user.format(prompt="Q") == "USER: Q\nASSISTANT:"
    assert PROMPT_FORMATS["llama2"].user.format(prompt="Q") == "[INST] Q [/INST]"
    assert PROMPT_FORMATS["plain"].user.format(prompt="Q") == "Q\n"


def test_instruction_sequence_loss_on_answer_only(base):
    _, folder = base
    lm = SeedLM.build(lm_config(folder, prompt_format="vicuna"))
    image = torch.arange(32) % CODES
    ids, labels = lm.instruction_sequence(image, "what color is the background ?", "blue")
    tok = lm.tokenizer
    text = tok.convert_ids_to_tokens(ids)
    # <s>? USER: <img> codes </img> question ASSISTANT: | blue </s>
    start = text.index(IMG_BEGIN)
    assert text[start + 33] == IMG_END and ids[start + 1:start + 33] == [lm.image_offset + int(i) for i in image]
    assert "USER" in text[:start] and text[-4:] == ["ASSISTANT", ":", "blue", "</s>"]
    assert [l for l in labels if l != IGNORE] == [tok.convert_tokens_to_ids("blue"), lm.eos_id]
    assert labels[-2:] == ids[-2:]


def test_caption_sequences_both_directions_and_padding(base):
    _, folder = base
    lm = SeedLM.build(lm_config(folder))
    image = torch.arange(32)
    i2t = lm.caption_sequence(image, "a red apple on a blue background", image_first=True)
    t2i = lm.caption_sequence(image, "a red apple", image_first=False)
    for ids, labels in (i2t, t2i):
        bos = len(lm.bos_ids)
        assert labels[bos:] == ids[bos:]  # loss on every token
        assert ids[-1] == lm.eos_id
    assert i2t[0][len(lm.bos_ids)] == lm.begin_id and t2i[0][-2] == lm.end_id
    batch = lm.collate([i2t, t2i])
    short = len(t2i[0])
    assert batch["attention_mask"][1, short:].sum() == 0 and (batch["labels"][1, short:] == IGNORE).all()
    assert (batch["input_ids"][1, short:] == lm.pad_id).all()


def test_bad_image_ids_raise(base):
    _, folder = base
    lm = SeedLM.build(lm_config(folder))
    with pytest.raises(IdsError):
        lm.caption_sequence(torch.arange(31), "x", True)
    with pytest.raises(IdsError):
        lm.caption_sequence(torch.full((32,), CODES), "x", True)


# ------------------------------------------------------------------------------------------ generation
def test_draw_constrained_exactly_n_image_tokens(base):
    _, folder = base
    lm = SeedLM.build(lm_config(folder))
    perturb(lm)
    prompt = lm.draw_prompt("a red apple")
    assert prompt[-1] == lm.begin_id
    out = lm.generate_ids([prompt, lm.draw_prompt("blue")], 32, "image", temperature=1.0, top_p=0.9, seed=3)
    for row in out:
        assert len(row) == 32 and all(lm.image_offset <= t < lm.image_offset + CODES for t in row)
    ids = lm.draw(["a red apple", "a cat"], temperature=1.0, top_p=1.0, seed=0)
    assert ids.shape == (2, 32) and ids.min() >= 0 and ids.max() < CODES
    # text generation never emits image tokens
    text = lm.generate_ids([lm.encode([(Image_(ids[0]), False)])[0]], 20, "text", temperature=1.0, seed=0)[0]
    assert all(t not in lm.new_token_ids() for t in text)


def test_batch_equals_single_with_same_seed(base):
    _, folder = base
    lm = SeedLM.build(lm_config(folder))
    perturb(lm)
    prompts = ["a red apple on a blue background", "cat"]
    batch = lm.draw(prompts, temperature=1.0, top_p=0.9, seed=7)
    single0 = lm.draw(prompts[0], temperature=1.0, top_p=0.9, seed=7)
    single1 = lm.draw(prompts[1], temperature=1.0, top_p=0.9, seed=8)  # row i uses seed + i
    assert torch.equal(batch[0], single0[0]) and torch.equal(batch[1], single1[0])
    again = lm.draw(prompts, temperature=1.0, top_p=0.9, seed=7)
    assert torch.equal(batch, again)
    ids = torch.randint(0, CODES, (2, 32), generator=torch.Generator().manual_seed(0))
    assert lm.caption(ids) == [lm.caption(ids[0])[0], lm.caption(ids[1])[0]]


def test_kv_cache_matches_full_forward(base):
    """Greedy decoding with the cache gives the argmax of a full forward at every step."""
    _, folder = base
    lm = SeedLM.build(lm_config(folder))
    perturb(lm)
    prompt = lm.draw_prompt("a red apple")
    out = lm.generate_ids([prompt], 8, "image", temperature=0.0)[0]
    seq = list(prompt)
    for token in out:
        with torch.no_grad():
            logits = lm(torch.tensor([seq])).logits[0, -1]
        allowed = lm.image_token_ids()
        assert int(allowed[logits[allowed].argmax()]) == token
        seq.append(token)


def test_sampling_top_k_one_is_greedy(base):
    _, folder = base
    lm = SeedLM.build(lm_config(folder))
    perturb(lm)
    greedy = lm.draw("a cat", temperature=0.0)
    assert torch.equal(lm.draw("a cat", temperature=1.5, top_k=1, seed=5), greedy)
    assert torch.equal(lm.draw("a cat", temperature=1.5, top_p=1e-6, seed=9), greedy)


# ------------------------------------------------------------------------------------------ save / load / merge
def test_save_load_round_trip_and_merge(base, tmp_path):
    _, folder = base
    lm = SeedLM.build(lm_config(folder))
    perturb(lm)
    x = torch.tensor([lm.caption_sequence(torch.arange(32), "a red apple", True)[0]])
    with torch.no_grad():
        ref = lm(x).logits
    lm.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["kind"] == "seedlm"
    loaded = SeedLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)
    merged_dir = lm.save_merged(tmp_path / "merged")
    merged = SeedLM.from_pretrained(merged_dir)
    assert merged.image_offset == lm.image_offset and merged.config.lora_r == 0
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, ref, atol=1e-4, rtol=1e-4)
    from transformers import AutoModelForCausalLM  # a plain transformers folder too

    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(str(merged_dir))(x).logits, ref,
                                   atol=1e-4, rtol=1e-4)


def test_load_rejects_mismatched_checkpoint(base, tmp_path):
    from seedtok.errors import CheckpointError

    _, folder = base
    lm = SeedLM.build(lm_config(folder))
    state = {k: v.clone() for k, v in lm.stored_state_dict().items()}
    key = next(iter(state))
    state[key] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        lm.load_state_dict_checked(state)
    state.pop(key)
    with pytest.raises(CheckpointError, match="missing"):
        lm.load_state_dict_checked(state)


# ------------------------------------------------------------------------------------------ training
def test_one_step_lowers_loss_on_fixed_batch(base):
    from seedtok.train.lm import LMTask

    _, folder = base
    lm = SeedLM.build(lm_config(folder))
    g = torch.Generator().manual_seed(0)
    seqs = [lm.caption_sequence(torch.randint(0, CODES, (32,), generator=g), "a red apple on a blue background",
                                image_first=i % 2 == 0) for i in range(4)]
    seqs.append(lm.instruction_sequence(torch.arange(32), "what color is the background ?", "blue"))
    batch = lm.collate(seqs)
    task = LMTask()
    params = [p for _, p in task.trainable_parameters(lm)]
    for p in lm.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    task.train_mode(lm)
    before, _ = task.loss(lm, batch)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after, _ = task.loss(lm, batch)
    assert after.item() < before.item() - 1e-3
    # the new rows moved, the base rows did not
    embed = lm.model.get_input_embeddings()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lm.trainable_named_parameters()
               if "trainable_tokens_delta" in n)


def test_labelled_logits_only_gives_the_same_loss_and_gradients(base):
    _, folder = base
    lm = SeedLM.build(lm_config(folder))
    perturb(lm)
    g = torch.Generator().manual_seed(3)
    seqs = [lm.caption_sequence(torch.randint(0, CODES, (32,), generator=g), "a red apple on a blue background",
                                image_first=True, label_image=False),
            lm.caption_sequence(torch.randint(0, CODES, (32,), generator=g), "a cat", image_first=False),
            lm.instruction_sequence(torch.arange(32), "what color is the background ?", "blue")]
    batch = lm.collate(seqs)
    lm.eval()  # no dropout: both passes see the same network
    params = [p for _, p in lm.trainable_named_parameters()]
    losses, grads = [], []
    for only in (False, True):
        out = lm(**batch, labelled_logits_only=only)
        losses.append(out.loss)
        grads.append(torch.autograd.grad(out.loss, params))
    assert lm._keeps_logits_by_mask()
    labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    positions = batch["labels"].numel()
    assert out.logits.shape[0] == labelled < positions / 2  # the output layer ran at the labelled tokens only
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert any(a.abs().sum() > 0 for a in grads[1])


def test_generation_without_cache_gives_the_same_tokens(base):
    """The no-cache baseline (benchmarks/lm_speed.py) recomputes every step and must pick the same tokens,
    batched with left padding, greedy and sampled."""
    _, folder = base
    lm = SeedLM.build(lm_config(folder))
    perturb(lm)
    prompts = [lm.draw_prompt("a red apple"), lm.draw_prompt("a cat on a blue background")]
    assert len(prompts[0]) != len(prompts[1])  # so one row is left-padded
    for mode, n, kw in (("image", 12, {"temperature": 0.0}), ("image", 12, {"temperature": 1.0, "top_p": 0.9}),
                        ("text", 10, {"temperature": 1.0, "seed": 5})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cached = lm.generate_ids(prompts, n, mode, **kw)
        # the cache goes in under the installed transformers' own argument name, not a deprecated one
        assert not [w for w in caught if "past_key_values" in str(w.message)]
        again = lm.generate_ids(prompts, n, mode, use_cache=False, **kw)
        assert cached == again
    assert len(set(map(tuple, lm.generate_ids(prompts, 12, "image", temperature=1.0)))) == 2


def test_lm_average_is_the_weighted_mean_of_two_checkpoints(base, tmp_path, capsys):
    from seedtok.cli import main

    _, folder = base
    first, second = SeedLM.build(lm_config(folder)), SeedLM.build(lm_config(folder))
    perturb(first)
    perturb(second, seed=2)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    assert main(["lm", "average", str(tmp_path / "a"), str(tmp_path / "b"), "--weight", "0.25",
                 "--out", str(tmp_path / "soup")]) == 0
    soup = SeedLM.from_pretrained(tmp_path / "soup").stored_state_dict()
    a, b = first.stored_state_dict(), second.stored_state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    for key in a:
        torch.testing.assert_close(soup[key], 0.75 * a[key] + 0.25 * b[key])
    other = SeedLM.build(lm_config(folder, lora_r=2))
    other.save_pretrained(tmp_path / "c")
    capsys.readouterr()
    assert main(["lm", "average", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "lora_r 4 != 2" in err
    assert not (tmp_path / "bad").exists()
