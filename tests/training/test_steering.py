"""Joint prompt-generator + adapter training: the cached-prefix loss, chamfer pre-training,
the held-out diagnostic, LoRA merge, resume."""

from dataclasses import replace

import pytest
import torch
from dglm.engine import bundle as bundle_io
from dglm.engine.api import GenerationParams
from dglm.engine.diffusion.score_network import ScoreNetConfig, ScoreNetwork
from dglm.engine.engine import Engine
from dglm.engine.evaluation.generation import released_decoder
from dglm.engine.models import load_decoder
from dglm.engine.models.lora import LoraConfig, add_lora, lora_state_dict, merge_lora, unwrap_lora
from dglm.engine.prompt.generator import (
    PROMPT_GENERATOR_PRESETS,
    PromptGenerator,
    PromptGeneratorConfig,
)
from dglm.engine.training import data as data_mod
from dglm.engine.training.diffusion import train_diffusion
from dglm.engine.training.loop import TrainConfig
from dglm.engine.training.prompt import (
    build_lm_batch,
    lm_loss_with_soft_prompt,
    train_prompt_generator,
)
from dglm.engine.training.recipes import (
    LATENTS,
    PAIRS,
    add_steering,
    assemble_bundle,
    train_steering_run,
)
from dglm.engine.training.steering import (
    SteerConfig,
    build_steer_batch,
    chamfer_loss,
    content_targets,
    frequent_tokens,
    pretrain_prompt_generator,
    steer_lm_loss,
    train_steering,
)
from safetensors.torch import load_file, save_file
from training_fixtures import coded_task, log_rows, split_rows

TINY_PG = PROMPT_GENERATOR_PRESETS["tiny"]


@pytest.fixture
def decoder(tiny_llama_dir):
    return load_decoder(str(tiny_llama_dir))[0]


def _rows(gen: torch.Generator, n: int, lo: int, hi: int) -> list[list[int]]:
    return [
        torch.randint(
            4, 250, (int(torch.randint(lo, hi + 1, (1,), generator=gen)),), generator=gen
        ).tolist()
        for _ in range(n)
    ]


def test_steer_batch_layout():
    b = build_steer_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], prompt_len=2, pad_id=0)
    assert b["prefix_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["prefix_pos"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert b["new_ids"].tolist() == [[0, 0, 1, 2, 0], [0, 0, 3, 4, 9]]
    assert b["new_pos"].tolist() == [[3, 4, 5, 6, 7], [1, 2, 3, 4, 5]]
    assert b["new_mask"].tolist() == [[True] * 4 + [False], [True] * 5]
    assert b["labels"].tolist() == [[-100, 1, 2, -100, -100], [-100, 3, 4, 9, -100]]
    plain = build_steer_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], prompt_len=0, pad_id=0)
    assert plain["first"].tolist() == [1, 3]
    assert plain["labels"].tolist() == [[2, -100, -100], [4, 9, -100]]
    with pytest.raises(ValueError, match="continuation"):
        build_steer_batch([[5]], [[]], 2, 0)


@pytest.mark.parametrize("prompt_len", [0, 3])
def test_cached_prefix_loss_equals_one_full_pass(decoder, prompt_len):
    # the prefix-KV, LM-head-at-continuation-only loss is the plain teacher-forced loss
    g = torch.Generator().manual_seed(1)
    pre, cont = _rows(g, 5, 1, 7), _rows(g, 5, 1, 6)
    soft = torch.randn(5, prompt_len, 64, generator=g) if prompt_len else None
    ref = lm_loss_with_soft_prompt(decoder, build_lm_batch(pre, cont, prompt_len, 0), soft)
    batch = build_steer_batch(pre, cont, prompt_len, 0)
    got = steer_lm_loss(decoder, batch, soft)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    per_row = steer_lm_loss(decoder, batch, soft, per_row=True)
    for r in range(5):
        one = lm_loss_with_soft_prompt(
            decoder,
            build_lm_batch(pre[r : r + 1], cont[r : r + 1], prompt_len, 0),
            None if soft is None else soft[r : r + 1],
        )
        torch.testing.assert_close(per_row[r], one, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_soft_prompt_and_adapters_only(decoder):
    adapters = add_lora(decoder, LoraConfig(rank=2, alpha=4.0))
    g = torch.Generator().manual_seed(2)
    pre, cont = _rows(g, 3, 2, 5), _rows(g, 3, 2, 5)
    soft = torch.randn(3, 2, 64, generator=g, requires_grad=True)
    steer_lm_loss(decoder, build_steer_batch(pre, cont, 2, 0), soft).backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    m = next(iter(adapters.values()))
    assert m.lora_b.grad is not None and m.lora_b.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in decoder.named_parameters() if "lora" not in n)


def test_lora_merge_matches_the_adapted_decoder(decoder, tiny_llama_dir):
    cfg = LoraConfig(rank=3, alpha=6.0)
    adapters = add_lora(decoder, cfg)
    g = torch.Generator().manual_seed(3)
    for m in adapters.values():
        m.lora_b.data = torch.randn(m.lora_b.shape, generator=g) * 0.05
    x = torch.randn(2, 5, 64, generator=g)
    pos = torch.arange(5).expand(2, 5)
    adapted = decoder(x, pos)
    fresh = load_decoder(str(tiny_llama_dir))[0]
    base = fresh(x, pos)
    merge_lora(fresh, cfg, lora_state_dict(decoder))
    merged = fresh(x, pos)
    assert (adapted - base).abs().max() > 1e-3  # the adapters do something
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    unwrap_lora(decoder)
    assert not any("lora" in n for n, _ in decoder.named_parameters())
    torch.testing.assert_close(decoder(x, pos), adapted, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="do not match"):
        merge_lora(fresh, cfg, {"layers.0.nope.lora_a": torch.zeros(3, 64)})


def test_chamfer_loss_is_lowest_on_the_targets():
    g = torch.Generator().manual_seed(4)
    target = torch.randn(2, 5, 16, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    exact = chamfer_loss(target[:, [0, 1, 1, 0]], target, mask)
    other = chamfer_loss(torch.randn(2, 4, 16, generator=g), target, mask)
    assert exact < other
    # only the first two tokens count in row 1: covering them is a perfect score there
    cover = chamfer_loss(target[1:, :2], target[1:], mask[1:])
    torch.testing.assert_close(cover, torch.tensor(-1.0))


def test_chamfer_loss_without_content_tokens_is_zero_not_inf():
    soft, target = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    loss = chamfer_loss(soft, target, torch.zeros(2, 4, dtype=torch.bool), norm_weight=0.1)
    assert loss.item() == 0.0


def test_content_targets_skip_frequent_tokens():
    rows = [[1, 2, 3, 1], [1, 4], [1]]
    skip = frequent_tokens(rows, 1)
    assert skip.tolist() == [1]
    ids, mask = content_targets(rows, skip, 8)
    assert ids.tolist() == [[2, 3], [4, 0], [0, 0]]
    assert mask.tolist() == [[True, True], [True, False], [False, False]]


def test_chamfer_pretraining_lowers_its_loss_and_resumes(tmp_path, decoder):
    train, held = (part[1:] for part in split_rows(coded_task()))  # (continuation ids, latents)
    emb = decoder.embed_tokens.weight
    steer = SteerConfig(skip_frequent=0, autocast_bf16=False)

    def run(steps: int) -> list[dict]:
        cfg = TrainConfig(
            steps=steps, batch_size=16, lr=3e-3, warmup=2, eval_every=10, save_every=10
        )
        pretrain_prompt_generator(PromptGenerator(TINY_PG), emb, train, held, tmp_path, cfg, steer)
        return log_rows(tmp_path)

    rows = run(30)
    assert rows[-1]["eval_chamfer"] < rows[0]["eval_chamfer"] - 0.05, rows
    assert [r["step"] for r in run(40)] == [10, 20, 30, 40]  # resumed at 30, not restarted


def test_joint_training_carries_the_latent(tmp_path, decoder):
    train, held = split_rows(coded_task())
    cfg = TrainConfig(
        steps=40, batch_size=16, lr=3e-3, warmup=2, eval_every=40, save_every=20, ema_decay=0.5
    )
    pg = PromptGenerator(TINY_PG)
    steer = SteerConfig(alpha2_min=0.9, shuffle_rows=16, autocast_bf16=False)
    lora = LoraConfig(rank=2, alpha=4.0)
    modules = train_steering(pg, decoder, train, held, 0, tmp_path, cfg, lora, steer)
    rows = log_rows(tmp_path)
    start, end = rows[0], rows[-1]
    assert start["phase"] == "start" and end["step"] == 40
    # the code → continuation map is learnable only through the soft prompt: matched ≪ shuffled
    assert end["eval_matched"] < end["eval_shuffled"] - 0.3, end
    assert end["eval_matched"] < start["eval_matched"] - 0.5, (start, end)
    state = modules.lora_state()
    assert state and all(k.endswith((".lora_a", ".lora_b")) for k in state)
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("lora_b"))
    assert set(state) == set(lora_state_dict(decoder))


def test_bundle_with_adapters_loads_merged_and_saves_back(tmp_path, tiny_llama_dir):
    torch.manual_seed(0)
    pg_cfg = PromptGeneratorConfig(
        latent_dim=384, decoder_dim=64, dim=64, depth=2, head_dim=32, prompt_len=4
    )
    sn_cfg = ScoreNetConfig(latent_dim=384, dim=64, depth=2, head_dim=32, num_tokens=8)
    pre, cont, lat = coded_task(32, 384)
    tc = TrainConfig(steps=1, batch_size=16, eval_every=1, save_every=1, warmup=1)
    train_diffusion(ScoreNetwork(sn_cfg), (lat, lat), (lat, lat), tmp_path / "sn", tc)
    dec = load_decoder(str(tiny_llama_dir))[0]
    data = (pre, cont, lat)
    train_prompt_generator(PromptGenerator(pg_cfg), dec, data, data, 0, tmp_path / "pg", tc)
    assemble_bundle(
        tmp_path / "b",
        tmp_path / "sn",
        tmp_path / "pg",
        [],
        encoder="all-MiniLM-L6-v2",
        decoder=str(tiny_llama_dir),
    )
    # a joint run whose adapters visibly change the decoder
    cfg = TrainConfig(steps=6, batch_size=16, lr=1e-2, warmup=1, eval_every=6, save_every=6)
    steer = SteerConfig(shuffle_rows=8, autocast_bf16=False)
    lora = LoraConfig(rank=2, alpha=4.0)
    modules = train_steering(
        PromptGenerator(pg_cfg), dec, data, data, 0, tmp_path / "run" / "joint", cfg, lora, steer
    )
    config = add_steering(tmp_path / "b", tmp_path / "run", out=tmp_path / "b2")
    assert config.decoder_lora == lora
    assert (tmp_path / "b2" / bundle_io.LORA_FILE).is_file()
    x = torch.randn(1, 4, 64)
    pos = torch.arange(4)[None]
    ref = dec(x, pos)  # the adapted decoder, adapters unmerged
    merged, _ = bundle_io.load_bundle_decoder(config, tmp_path / "b2")
    torch.testing.assert_close(merged(x, pos), ref, rtol=2e-3, atol=2e-3)  # fp16-stored adapters
    assert (merged(x, pos) - load_decoder(str(tiny_llama_dir))[0](x, pos)).abs().max() > 1e-3
    pg_saved = PromptGenerator(pg_cfg)
    bundle_io.load_state(pg_saved, tmp_path / "b2" / bundle_io.PROMPT_GEN_FILE)
    torch.testing.assert_close(
        pg_saved(lat[:2], torch.ones(2)), modules.pg(lat[:2], torch.ones(2)), rtol=1e-2, atol=1e-2
    )
    engine = Engine.from_pretrained(tmp_path / "b2")
    out = engine.generate(["Hello"], GenerationParams(seed=0, max_new_tokens=3))
    assert out[0].samples[0].token_ids
    # evaluation judges with, and decodes plainly on, the decoder as released
    base = released_decoder(engine)
    torch.testing.assert_close(base(x, pos), load_decoder(str(tiny_llama_dir))[0](x, pos))
    plain = Engine.from_pretrained(tmp_path / "b")  # no adapters: its own decoder is the release
    assert released_decoder(plain) is plain.decoder
    engine.save_pretrained(tmp_path / "b3")
    again = Engine.from_pretrained(tmp_path / "b3")
    torch.testing.assert_close(again.decoder(x, pos), engine.decoder(x, pos))
    (tmp_path / "b3" / bundle_io.LORA_FILE).unlink()
    with pytest.raises(ValueError, match="missing"):
        Engine.from_pretrained(tmp_path / "b3")


def test_joint_training_with_the_chamfer_term(tmp_path, decoder):
    data, _ = split_rows(coded_task())
    cfg = TrainConfig(steps=1, batch_size=16, lr=3e-3, warmup=1, eval_every=1, save_every=1)
    losses = []
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        steer = SteerConfig(
            shuffle_rows=16, autocast_bf16=False, chamfer_weight=weight, skip_frequent=0
        )
        out = tmp_path / f"w{weight}"
        train_steering(PromptGenerator(TINY_PG), decoder, data, data, 0, out, cfg, None, steer)
        losses.append(log_rows(out)[-1]["loss"])
    # same initial weights and batch: the logged losses differ by the weighted chamfer term
    assert abs(losses[1] - losses[0]) > 1e-3, losses


def test_train_steering_run_from_a_bundle_and_data_dir(tmp_path, tiny_bundle):
    g = torch.Generator().manual_seed(5)
    for split, n in (("train", 24), ("eval", 8)):
        pairs = [
            data_mod.Pair(f"prefix {split} {i} abc", f" continuation {i} xyz", "t")
            for i in range(n)
        ]
        data_mod.write_jsonl(tmp_path / PAIRS.format(split=split), pairs)
        lat = {
            "prefix": torch.randn(n, 384, generator=g),
            "continuation": torch.randn(n, 384, generator=g),
        }
        save_file(
            {k: v.half() for k, v in lat.items()}, str(tmp_path / LATENTS.format(split=split))
        )
    small = TrainConfig(steps=2, batch_size=8, warmup=1, eval_every=2, save_every=2)
    joint = replace(small, keep_every=1)  # a snapshot per step: the learning curve's points
    steer = SteerConfig(shuffle_rows=4, autocast_bf16=False, skip_frequent=0)
    logs = train_steering_run(
        tmp_path, tiny_bundle, tmp_path / "run", small, joint, LoraConfig(rank=2), steer
    )
    # the last logged diagnostic of the joint stage, with its step
    assert logs["step"] == 2 and logs["eval_gap"] == logs["eval_shuffled"] - logs["eval_matched"]
    assert (tmp_path / "run" / "chamfer" / "checkpoint.pt").is_file()
    config = add_steering(tiny_bundle, tmp_path / "run", out=tmp_path / "bundle")
    assert config.decoder_lora == LoraConfig(rank=2)
    snaps = sorted((tmp_path / "run" / "joint" / "snapshots").glob("step-*.pt"))
    assert [p.name for p in snaps] == ["step-0000001.pt", "step-0000002.pt"]
    assert not (tmp_path / "run" / "chamfer" / "snapshots").exists()  # keep_every 0 there
    first = torch.load(snaps[0], weights_only=True)
    assert first["step"] == 1 and "opt" not in first
    # a snapshot goes into a bundle as the last checkpoint does; the step-1 weights differ
    add_steering(tiny_bundle, tmp_path / "run", tmp_path / "at1", snapshot=snaps[0])
    last = load_file(str(tmp_path / "bundle" / "prompt_generator.safetensors"))
    at1 = load_file(str(tmp_path / "at1" / "prompt_generator.safetensors"))
    assert last.keys() == at1.keys() and any(not torch.equal(last[k], at1[k]) for k in last)
    with pytest.raises(ValueError, match="no .*step-9.pt"):
        add_steering(tiny_bundle, tmp_path / "run", snapshot=tmp_path / "step-9.pt")
    # the bundle now has adapters: accumulating runs must keep their settings
    with pytest.raises(ValueError, match="same LoRA settings"):
        train_steering_run(
            tmp_path, tmp_path / "bundle", tmp_path / "run2", None, small, LoraConfig(rank=4), steer
        )
