import dataclasses
import json

import pytest
import torch

from seedtok import ConfigError, SeedTokenizer, preset
from seedtok.data.sources import open_source
from seedtok.train import train_tokenizer
from seedtok.train.data import TokenizerData
from seedtok.train.loop import BatchOrder, TrainConfig, Trainer, lr_factor, parameter_groups
from seedtok.train.tokenizer import Stage1, Stage2, contrastive_loss, image_states


@pytest.fixture(scope="module")
def samples():
    return open_source("emoji:train:32")


def _step_lowers_loss(task, model, data, lr=1e-3):
    batch = data.batch(list(range(8)))
    named = task.trainable_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in named:
        p.requires_grad_(True)
    model.train()
    torch.manual_seed(0)
    for layer in model.modules():  # no dropout: compare the same function before and after
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    opt = torch.optim.AdamW([p for _, p in named], lr=lr)
    before, _ = task.loss(model, batch)
    before.backward()
    opt.step()
    with torch.no_grad():
        after, _ = task.loss(model, batch)
    assert after.item() < before.item()


def test_stage1_step_lowers_the_loss(samples):
    model = SeedTokenizer(preset("micro"))
    _step_lowers_loss(Stage1(), model, TokenizerData(model, samples, 1, "x", progress=False))


def test_stage2_step_lowers_the_loss(samples):
    model = SeedTokenizer(preset("micro"))
    _step_lowers_loss(Stage2(), model, TokenizerData(model, samples, 2, "x", progress=False))


def test_stage2_freezes_the_qformer_and_stage1_trains_ln_vision():
    model = SeedTokenizer(preset("micro"))
    names2 = [n for n, _ in Stage2().trainable_parameters(model)]
    assert names2 and all(n.startswith(("quantizer.", "detokenizer.")) for n in names2)
    names1 = [n for n, _ in Stage1().trainable_parameters(model)]
    assert "vision.ln_vision.weight" in names1 and "qformer.query_tokens" in names1
    assert not any(n.startswith("vision.model") for n in names1)


def test_contrastive_loss_is_symmetric_infonce_with_label_smoothing():
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    temp = torch.tensor(0.07)
    logits = img @ txt.t() / temp
    n, eps = 4, 0.1

    def smoothed_ce(lg):
        logp = lg.log_softmax(-1)
        target = torch.full((n, n), eps / n) + torch.eye(n) * (1 - eps)
        return -(target * logp).sum(-1).mean()

    expected = (smoothed_ce(logits) + smoothed_ce(logits.t())) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, temp), expected)


def test_weight_decay_skips_biases_norms_and_scalars():
    model = SeedTokenizer(preset("micro"))
    named = Stage1().trainable_parameters(model)
    decay, no_decay = parameter_groups(named, 0.05)
    by_id = {id(p): n for n, p in named}
    skipped = {by_id[id(p)] for p in no_decay["params"]}
    assert "qformer.temp" in skipped and "vision.ln_vision.weight" in skipped
    assert any(n.endswith("LayerNorm.weight") for n in skipped) and any(n.endswith(".bias") for n in skipped)
    assert "qformer.query_tokens" in {by_id[id(p)] for p in decay["params"]}


def test_lr_scales_give_matching_parameters_their_own_learning_rate():
    a, b, c = (torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(3))
    bias = torch.nn.Parameter(torch.zeros(2))
    named = [("layer.lora_A.weight", a), ("rows.delta", b), ("layer.lora_B.weight", c), ("layer.lora_B.bias", bias)]
    groups = parameter_groups(named, 0.05, lr=1e-3, lr_scales={"lora_": 0.2})
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(a)]["lr"] == by_param[id(c)]["lr"] == pytest.approx(2e-4)
    assert by_param[id(b)]["lr"] == pytest.approx(1e-3)
    assert by_param[id(bias)]["lr"] == pytest.approx(2e-4) and by_param[id(bias)]["weight_decay"] == 0.0
    assert by_param[id(a)]["weight_decay"] == 0.05
    # the first matching key wins; without scales, the two usual groups
    first = parameter_groups(named, 0.05, lr=1e-3, lr_scales={"lora_A": 0.5, "lora_": 0.1})
    assert {id(p): g["lr"] for g in first for p in g["params"]}[id(a)] == pytest.approx(5e-4)
    assert len(parameter_groups(named, 0.05, lr=1e-3)) == 2
    # the optimiser keeps the ratio through the schedule
    cfg = TrainConfig(steps=10, lr=1e-3, min_lr=1e-4, warmup_steps=0, lr_scales={"lora_": 0.2})
    opt = torch.optim.AdamW(parameter_groups(named, 0.0, cfg.lr, cfg.lr_scales), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    for _ in range(5):
        opt.step()
        sched.step()
    lrs = sorted(g["lr"] for g in opt.param_groups if g["params"])
    assert lrs[0] / lrs[-1] == pytest.approx(0.2)


def test_lr_schedule_warms_up_then_follows_a_cosine_to_min_lr():
    cfg = TrainConfig(steps=110, lr=1e-4, min_lr=1e-5, warmup_steps=10, warmup_start_lr=1e-6)
    assert lr_factor(0, cfg) * cfg.lr == pytest.approx(1e-6)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) * cfg.lr == pytest.approx(1e-5 + (1e-4 - 1e-5) / 2)
    assert lr_factor(110, cfg) * cfg.lr == pytest.approx(1e-5)
    # a run that stops before its schedule ends follows the longer run's schedule exactly
    longer = TrainConfig(steps=210, lr=1e-4, min_lr=1e-5, warmup_steps=10, warmup_start_lr=1e-6)
    truncated = TrainConfig(steps=110, schedule_steps=210, lr=1e-4, min_lr=1e-5, warmup_steps=10, warmup_start_lr=1e-6)
    assert [lr_factor(s, truncated) for s in range(111)] == [lr_factor(s, longer) for s in range(111)]
    assert lr_factor(110, truncated) * truncated.lr == pytest.approx(1e-5 + (1e-4 - 1e-5) / 2)


def test_batch_order_covers_each_epoch_once_and_shards_ranks():
    order = BatchOrder(20, 4, seed=3)
    epoch = sum((order.indices(s) for s in range(5)), [])
    assert sorted(epoch) == list(range(20))
    assert order.indices(5) != order.indices(0)  # a new permutation next epoch
    ranks = [BatchOrder(20, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    union = sum((r.indices(s) for r in ranks for s in range(5)), [])
    assert sorted(union) == list(range(20))


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_after_interruption_gives_identical_weights(tmp_path, stage):
    init = None
    if stage == 2:
        train_tokenizer("micro", 1, out=tmp_path / "s1", progress=False)
        init = tmp_path / "s1" / "final"
    full = train_tokenizer("micro", stage, out=tmp_path / "full", init=init, progress=False)
    # interrupted run: stop after 5 of 8 steps (checkpoint at 4), then resume
    model_cfg = preset("micro")
    from seedtok.train import load_run_config

    _, cfg = load_run_config("micro", stage)
    model = SeedTokenizer(model_cfg) if stage == 1 else SeedTokenizer.from_pretrained(init).train()
    data = TokenizerData(model, open_source(cfg.data), stage, cfg.data, progress=False,
                         captions=cfg.caption_weight > 0)
    task = Stage1() if stage == 1 else Stage2(cfg.retrieval_weight, cfg.last_query_weight, cfg.caption_weight,
                                              data.caption_bank)
    if stage == 2:
        assert task.caption_weight and task.retrieval_weight  # the micro recipe runs the named additions
    trainer = Trainer(cfg, model, task, data, tmp_path / "cut", progress=False)
    trainer.fit(stop_after=5)
    resumed = train_tokenizer("micro", stage, out=tmp_path / "cut", init=init, resume=True, progress=False)
    assert resumed.steps == full.steps == 8
    a = SeedTokenizer.from_pretrained(tmp_path / "full" / "final").state_dict()
    b = SeedTokenizer.from_pretrained(tmp_path / "cut" / "final").state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logs = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert logs[-1]["step"] == 8


def test_a_finished_run_is_not_overwritten_without_resume(tmp_path):
    from seedtok import ConfigError

    train_tokenizer("micro", 1, out=tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train_tokenizer("micro", 1, out=tmp_path / "r", progress=False)


def test_cli_trains_both_stages_and_the_result_loads(tmp_path, capsys):
    from seedtok.cli import main

    assert main(["train", "tokenizer", "--stage", "1", "--config", "micro", "--out", str(tmp_path / "s1")]) == 0
    assert main(["train", "tokenizer", "--stage", "2", "--config", "micro", "--out", str(tmp_path / "s2"),
                 "--init", str(tmp_path / "s1" / "final")]) == 0
    assert "trained 8 steps" in capsys.readouterr().out
    s1 = SeedTokenizer.from_pretrained(tmp_path / "s1" / "final")
    s2 = SeedTokenizer.from_pretrained(tmp_path / "s2" / "final")
    assert torch.equal(s1.qformer.query_tokens, s2.qformer.query_tokens)  # frozen in stage 2
    assert not torch.equal(s1.quantizer.embedding.weight, s2.quantizer.embedding.weight)
    assert not torch.equal(SeedTokenizer(preset("micro")).qformer.query_tokens, s1.qformer.query_tokens)


def test_config_file_overrides_the_recipe(tmp_path):
    from seedtok.train import load_run_config
    from seedtok import ConfigError

    (tmp_path / "run.json").write_text(json.dumps({"model": "micro", "train": {"1": {"steps": 3, "lr": 0.01}}}))
    model_cfg, cfg = load_run_config(str(tmp_path / "run.json"), 1)
    assert model_cfg.name == "micro" and cfg.steps == 3 and cfg.lr == 0.01 and cfg.batch_size == 8
    (tmp_path / "bad.json").write_text(json.dumps({"model": "micro", "train": {"stepz": 3}}))
    with pytest.raises(ConfigError, match="stepz"):
        load_run_config(str(tmp_path / "bad.json"), 1)


def test_stage2_named_loss_additions_add_exactly_their_terms(samples):
    from seedtok.train.tokenizer import RETRIEVAL_TEMPERATURE

    model = SeedTokenizer(preset("micro")).eval()  # eval: no dropout, and the quantizer's training-only
    data = TokenizerData(model, samples, 2, "x", progress=False, captions=True)  # options stay off: exact terms
    batch = data.batch(list(range(8)))
    captions = list(dict.fromkeys(s.caption for s in samples))
    assert data.caption_bank.shape[0] == len(captions)
    assert [captions[i] for i in batch["caption"]] == [samples[i].caption for i in range(8)]
    with torch.no_grad():
        base, logs = Stage2().loss(model, batch)
        task = Stage2(retrieval_weight=1.5, last_query_weight=2.0, caption_weight=0.7, caption_bank=data.caption_bank)
        both, more = task.loss(model, batch)
        causal = model.qformer(image_states(model, batch))
        recon = model.detokenizer.reconstruct(model.quantizer(causal).codes)
        qf = model.qformer
        feats = qf.image_features(recon)
        # one way, no smoothing: -log softmax(cos / T) at the true target
        logits = feats @ qf.image_features(causal).t() / RETRIEVAL_TEMPERATURE
        retrieval = -(logits.log_softmax(dim=1).diagonal()).mean()
        tok = model.text_tokenizer()
        enc = tok([samples[i].caption for i in range(8)], padding=True, return_tensors="pt")
        text = qf.text_features(qf.encode_text(enc["input_ids"], enc["attention_mask"]))
        bank_logits = feats @ data.caption_bank.t() / RETRIEVAL_TEMPERATURE
        caption = (bank_logits.logsumexp(dim=1) - (feats * text).sum(dim=1) / RETRIEVAL_TEMPERATURE).mean()
        last = (1 - torch.nn.functional.cosine_similarity(recon[:, -1], causal[:, -1], dim=-1)).mean()
    assert "retrieval" not in logs and "last_cos" not in logs and "caption" not in logs
    torch.testing.assert_close(torch.tensor(more["retrieval"]), retrieval)
    torch.testing.assert_close(torch.tensor(more["caption"]), caption, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(more["last_cos"]), last)
    torch.testing.assert_close(both, base + 1.5 * retrieval + 2.0 * last + 0.7 * caption, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="caption_weight needs"):
        Stage2(caption_weight=1.0)
    # the paper recipes keep the paper's loss; the tiny recipe uses the additions
    from seedtok.train.recipes import recipe
    paper, tiny = recipe("seed2", 2), recipe("tiny", 2)
    assert paper.retrieval_weight == paper.last_query_weight == paper.caption_weight == 0
    assert tiny.retrieval_weight > 0 and tiny.last_query_weight > 0 and tiny.caption_weight > 0


def test_stage2_step_with_the_loss_additions_lowers_the_loss(samples):
    model = SeedTokenizer(preset("micro"))
    data = TokenizerData(model, samples, 2, "x", progress=False, captions=True)
    _step_lowers_loss(Stage2(retrieval_weight=1.0, last_query_weight=2.0, caption_weight=1.0,
                             caption_bank=data.caption_bank), model, data,
                      lr=1e-4)  # Adam's first step is lr * sign(grad): at 1e-3 it overshoots the sharp (T 0.05) terms


def test_stage2_generation_objectives_are_exactly_their_terms(samples):
    """"standardized" = MSE after z-scoring by the teacher statistics; the contrastive term is one-way InfoNCE
    between the standardised, L2-normalised generation and teacher embeddings (temperature 0.05)."""
    from seedtok.train.tokenizer import GEN_WEIGHT, RETRIEVAL_TEMPERATURE

    g, t = torch.randn(6, 5), torch.randn(6, 5)
    mean, std = torch.randn(5), torch.rand(5) + 0.5
    paper, _ = Stage2().generation_objective(g, t)
    torch.testing.assert_close(paper, GEN_WEIGHT * ((g - t) ** 2).mean())
    std_loss, logs = Stage2(generation_loss="standardized", teacher_stats=(mean, std)).generation_objective(g, t)
    torch.testing.assert_close(std_loss, GEN_WEIGHT * (((g - t) / std) ** 2).mean())
    both, logs = Stage2(generation_loss="standardized", generation_contrastive_weight=0.5,
                        teacher_stats=(mean, std)).generation_objective(g, t)
    zg = torch.nn.functional.normalize((g - mean) / std, dim=-1)
    zt = torch.nn.functional.normalize((t - mean) / std, dim=-1)
    nce = torch.nn.functional.cross_entropy(zg @ zt.t() / RETRIEVAL_TEMPERATURE, torch.arange(6))
    torch.testing.assert_close(torch.tensor(logs["gen_contrastive"]), nce)
    torch.testing.assert_close(both, std_loss + 0.5 * nce)
    with pytest.raises(ConfigError, match="generation_loss"):
        Stage2(generation_loss="l1")
    with pytest.raises(ConfigError, match="teacher"):
        Stage2(generation_loss="standardized")
    with pytest.raises(ConfigError, match="train_parts"):
        Stage2(train_parts="codebook")


def test_teacher_stats_cover_the_whole_cached_set(samples, tmp_path):
    model = SeedTokenizer(preset("micro")).eval()
    data = TokenizerData(model, samples, 2, "emoji:train:32", cache_dir=tmp_path, cache_features=True,
                         progress=False)
    mean, std = data.teacher_stats()
    teachers = model.vision.pooled_teacher(data.features.float())
    torch.testing.assert_close(mean, teachers.mean(0))
    torch.testing.assert_close(std, teachers.std(0).clamp(min=1e-3))
    with pytest.raises(ConfigError, match="cache_features"):
        TokenizerData(model, samples, 2, "x", progress=False).teacher_stats()


def test_generation_only_retrains_the_generation_branch_and_keeps_the_ids(tmp_path, samples):
    from seedtok.cli import main

    assert main(["train", "tokenizer", "--stage", "2", "--config", "micro", "--out", str(tmp_path / "s2"),
                 "--init", str(tmp_path / "none")]) != 0  # no such init: a clear error, not a traceback
    s1 = train_tokenizer("micro", 1, out=tmp_path / "s1", progress=False)
    train_tokenizer("micro", 2, out=tmp_path / "s2", init=s1.out_dir / "final", progress=False)
    (tmp_path / "gen.json").write_text(json.dumps({"model": "micro", "train": {
        "steps": 3, "cache_features": True, "generation_loss": "standardized", "generation_contrastive_weight": 1.0}}))
    assert main(["train", "tokenizer", "--stage", "2", "--config", str(tmp_path / "gen.json"), "--generation-only",
                 "--init", str(tmp_path / "s2" / "final"), "--out", str(tmp_path / "g")]) == 0
    before = SeedTokenizer.from_pretrained(tmp_path / "s2" / "final").eval()
    after = SeedTokenizer.from_pretrained(tmp_path / "g" / "final").eval()
    trained = {f"detokenizer.{n}" for n, _ in after.detokenizer.generation_parameters()}
    assert "detokenizer.distill_image_proj.weight" in trained and "detokenizer.pos_embed" not in trained
    old, new = before.state_dict(), after.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old if k not in trained)  # codebook, recon branch, Q-Former
    assert any(not torch.equal(old[k], new[k]) for k in trained)
    images = [samples[i].image for i in range(4)]
    ids = before.encode(images)
    assert torch.equal(ids, after.encode(images))
    assert not torch.allclose(before.decode_embeddings(ids), after.decode_embeddings(ids))
    with pytest.raises(ConfigError, match="--stage 2"):
        train_tokenizer("micro", 1, out=tmp_path / "x", generation_only=True, progress=False)


def test_generation_only_recipes():
    from seedtok.train.recipes import recipe

    tiny, paper = recipe("tiny", 2, generation_only=True), recipe("seed2", 2, generation_only=True)
    assert tiny.train_parts == paper.train_parts == "generation"
    assert tiny.generation_loss == "standardized" and tiny.generation_contrastive_weight > 0 and tiny.cache_features
    assert paper.generation_loss == "mse" and paper.generation_contrastive_weight == 0  # the paper's objective
    assert recipe("tiny", 2).train_parts == "all" and recipe("tiny", 2).generation_loss == "mse"


def test_train_result_summary_says_when_a_resumed_run_had_nothing_left(tmp_path):
    from seedtok.train.loop import TrainResult

    done = TrainResult(steps=360, final_loss=float("nan"), seconds=0.01, out_dir=tmp_path)
    assert done.summary() == "the run had already finished its 360 steps"
    trained = TrainResult(steps=360, final_loss=1.25, seconds=120.0, out_dir=tmp_path)
    assert trained.summary() == "trained 360 steps in 2.0 min, final loss 1.2500"


def test_auto_mixed_precision_uses_bf16_only_where_the_cpu_computes_in_it(tmp_path, monkeypatch):
    from seedtok.train import loop

    amx = tmp_path / "amx"
    amx.write_text("processor : 0\nflags : fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor : 0\nflags : fpu sse avx2 fma\n")
    assert loop.cpu_has_native_bf16(amx) and not loop.cpu_has_native_bf16(avx2)
    assert not loop.cpu_has_native_bf16(tmp_path / "missing")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    assert loop.auto_mixed_precision() == "bf16"
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    assert loop.auto_mixed_precision() == "no"
    from seedtok.train.recipes import decoder_recipe

    assert decoder_recipe("tiny").mixed_precision == "auto"


def test_one_process_can_train_again_with_another_precision(tmp_path):
    # accelerate refuses a second Accelerator with another mixed precision in the same process; a bf16 run
    # (what "auto" picks on a CPU with bf16 units) followed by an fp32 one must both train.
    from accelerate.state import AcceleratorState

    for name, mixed in (("bf16", "bf16"), ("fp32", "no")):
        run = tmp_path / f"{name}.json"
        run.write_text(json.dumps({"model": "micro", "train": {"1": {"steps": 2, "mixed_precision": mixed}}}))
        result = train_tokenizer(str(run), 1, out=tmp_path / name, progress=False)
        assert result.steps == 2
        assert AcceleratorState().mixed_precision == mixed
