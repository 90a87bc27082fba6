"""The static decode step (DecodeRunner): its eager path on CPU against the reference loop
(`generate(..., static=False)`, Decoder.forward over a growing KVCache), token for token; the
CUDA-graph path against the eager one on a GPU (marked gpu)."""

from __future__ import annotations

import pytest
import torch
from decoder_fixtures import (
    SMOL_PROMPTS,
    VOCAB,
    make_tiny_hf_dir,
    one_thread,  # noqa: F401 - autouse fixture
    smollm2,
)
from dglm.engine.decoding.buckets import round_up
from dglm.engine.decoding.loop import DecodeParams, generate
from dglm.engine.decoding.runner import DecodeRunner, DecodeRunnerConfig
from dglm.engine.models import load_decoder

GREEDY = DecodeParams(max_new_tokens=12, temperature=0.0)
SAMPLED = (
    DecodeParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=11),
    DecodeParams(max_new_tokens=10, temperature=1.2, top_k=7, seed=12),
    DecodeParams(max_new_tokens=12, temperature=0.0),
)


@pytest.fixture(scope="module", params=["llama_gqa", "gpt2"])
def tiny_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_hf_dir(request.param, path, seed=3)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_decoder(str(tiny_dir))  # (decoder, tokenizer), fp32 on CPU


def rand_rows(gen: torch.Generator, *lengths: int) -> list[list[int]]:
    return [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def tokens(results) -> list[list[int]]:
    return [r.token_ids for r in results]


# ------------------------------------------------------------------------- CPU: eager static step


@pytest.mark.parametrize("params", [(GREEDY,) * 3, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("soft", [0, 3], ids=["no_soft", "soft"])
def test_static_step_matches_reference_loop(tiny, gen, params, soft):
    """generate's default static step gives the reference loop's tokens: mixed prompt lengths
    (left padding), with and without a soft prompt, greedy and sampled rows in one batch."""
    decoder, tok = tiny
    rows = rand_rows(gen, 9, 2, 5)
    sp = torch.randn(3, soft, decoder.hidden_size, generator=gen) if soft else None
    ref, _ = generate(decoder, tok, rows, list(params), soft_prompt=sp, static=False)
    ours, _ = generate(decoder, tok, rows, list(params), soft_prompt=sp)
    assert tokens(ours) == tokens(ref)
    assert [r.finish_reason for r in ours] == [r.finish_reason for r in ref]


def test_eager_runner_is_reused_across_batches(tiny, gen):
    """One runner (static buffers for 4 rows × 48 slots, KV buckets) serves batches of 3, 1 and 2
    rows (rounded up to 4, 1 and 2) of different lengths; each call equals the reference loop."""
    decoder, tok = tiny
    config = DecodeRunnerConfig(
        batch_sizes=(1, 2, 4), max_len=48, seq_buckets=(16, 32), enforce_eager=True
    )
    runner = DecodeRunner(decoder, config)
    for lengths, params in (
        ((7, 3, 11), list(SAMPLED)),
        ((4,), [GREEDY]),
        ((20, 6), [SAMPLED[0], GREEDY]),
        ((7, 3, 11), list(SAMPLED)),
    ):
        rows = rand_rows(gen, *lengths)
        ref, _ = generate(decoder, tok, rows, params, static=False)
        ours, _ = generate(decoder, tok, rows, params, runner=runner)
        assert tokens(ours) == tokens(ref)
    assert {b for b, _ in runner._graphs} == {1, 2, 4}
    assert {s for _, s in runner._graphs} <= {16, 32, 48}


def test_runner_step_advances_on_the_device(tiny, gen):
    """begin / prefill / step by hand: positions and the write slot advance inside the step;
    logits equal Decoder.forward over the full sequence."""
    decoder, _ = tiny
    config = DecodeRunnerConfig(batch_sizes=(2,), max_len=16, enforce_eager=True)
    runner = DecodeRunner(decoder, config)
    ids = torch.randint(4, VOCAB, (2, 9), generator=gen)
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[1, :2] = False  # row 1 has two pads
    positions = (key_mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.inference_mode():
        ref = decoder(decoder.embed(ids), positions[:, :9], key_mask=key_mask[:, :9])
        runner.begin(2, 12, key_mask)
        logits = [runner.prefill(decoder.embed(ids[:, :6]), positions[:, :6])]
        for t in range(6, 9):
            logits.append(runner.step(ids[:, t]).clone())
    assert runner.slot == 9 and runner.write_pos.tolist() == [9]
    assert runner.positions.tolist() == [9, 7]
    out = torch.stack(logits, 1)  # (2, 4, V): positions 5..8
    assert (out - ref[:, 5:9]).abs().max().item() < 1e-5


def test_round_up_and_config_errors(tiny, tiny_dir):
    decoder, tok = tiny
    assert [round_up([1, 2, 4, 8], n, "batch_sizes") for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="batch_sizes"):
        round_up([1, 2, 4], 5, "batch_sizes")
    assert DecodeRunnerConfig(batch_sizes=(8, 1, 2, 2)).batch_sizes == (1, 2, 8)
    assert DecodeRunnerConfig(max_len=64, seq_buckets=(32, 16)).seq_buckets == (16, 32, 64)
    for bad in (
        dict(batch_sizes=()),
        dict(batch_sizes=(0, 2)),
        dict(max_len=0),
        dict(max_len=32, seq_buckets=(64,)),
        dict(step_impl="trace"),  # trace / compile need enforce_eager
        dict(step_impl="jit", enforce_eager=True),
    ):
        with pytest.raises(ValueError):
            DecodeRunnerConfig(**bad)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="enforce_eager"):
            DecodeRunner(decoder, DecodeRunnerConfig(max_len=32))
    with pytest.raises(ValueError, match="max_len"):
        DecodeRunner(decoder, DecodeRunnerConfig(max_len=10**6, enforce_eager=True))
    runner = DecodeRunner(decoder, DecodeRunnerConfig((1, 2), 24, enforce_eager=True))
    with pytest.raises(ValueError, match="batch_sizes"):
        generate(decoder, tok, [[5], [6], [7]], [GREEDY], runner=runner)
    with pytest.raises(ValueError, match="max_len"):
        generate(decoder, tok, [[5] * 20], [GREEDY], runner=runner)
    with pytest.raises(ValueError, match="either cache or runner"):
        generate(decoder, tok, [[5]], [GREEDY], cache=decoder.new_cache(1, 24), runner=runner)
    other, _ = load_decoder(str(tiny_dir))
    with pytest.raises(ValueError, match="another decoder"):
        generate(other, tok, [[5]], [GREEDY], runner=runner)


def test_traced_step_gives_bit_identical_logits(tiny, gen):
    """step_impl="trace": one TorchScript trace per (batch, KV) bucket, the same kernels without
    Python: the same tokens as the reference loop, and the same logits bit for bit."""
    decoder, tok = tiny
    config = DecodeRunnerConfig((1, 2, 4), 48, (16, 32), enforce_eager=True, step_impl="trace")
    runner = DecodeRunner(decoder, config)
    runner.warmup((3,))  # traces bucket 4 × every KV bucket now; bucket 1 at its first use
    assert sorted(runner._graphs) == [(4, 16), (4, 32), (4, 48)]
    for lengths, params in (((7, 3, 11), list(SAMPLED)), ((5,), [GREEDY]), ((7, 3, 11), [GREEDY])):
        rows = rand_rows(gen, *lengths)
        ref, _ = generate(decoder, tok, rows, params, static=False)
        ours, _ = generate(decoder, tok, rows, params, runner=runner)
        assert tokens(ours) == tokens(ref)
    assert all(step.traced is not None for step in runner._graphs.values())
    eager = DecodeRunner(decoder, DecodeRunnerConfig((4,), 16, enforce_eager=True))
    traced = DecodeRunner(decoder, DecodeRunnerConfig((4,), 16, enforce_eager=True,
                                                      step_impl="trace"))  # fmt: skip
    ids = torch.randint(4, VOCAB, (3, 8), generator=gen)
    positions = torch.arange(8).expand(3, 8)
    with torch.inference_mode():
        logits = []
        for r in (eager, traced):
            r.begin(3, 16, None)
            r.prefill(decoder.embed(ids[:, :5]), positions[:, :5])
            logits.append(torch.stack([r.step(ids[:, t]).clone() for t in range(5, 8)]))
    assert torch.equal(logits[0], logits[1])


@pytest.mark.slow
def test_compiled_eager_step_gives_the_same_tokens(tiny, gen):
    """torch.compile of the eager step (CPU): the same tokens as the uncompiled step."""
    decoder, tok = tiny
    config = DecodeRunnerConfig((1, 3), 40, enforce_eager=True, step_impl="compile")
    runner = DecodeRunner(decoder, config)
    for lengths, params in (((7, 3, 11), list(SAMPLED)), ((5,), [GREEDY])):
        rows = rand_rows(gen, *lengths)
        ref, _ = generate(decoder, tok, rows, params)
        ours, _ = generate(decoder, tok, rows, params, runner=runner)
        assert tokens(ours) == tokens(ref)


@pytest.mark.slow
def test_smollm2_fast_cpu_path_matches_hf_greedy():
    """SmolLM2, the CPU fast path (input-major weights, traced step, KV buckets): HF generate's
    greedy tokens at batch 1 and for 4 mixed-length prompts."""
    from test_loop import hf_greedy

    smol = smollm2()
    fast, tok = load_decoder("smollm2")
    fast.use_input_major_weights()
    config = DecodeRunnerConfig((1, 4), 96, (32, 64), enforce_eager=True, step_impl="trace")
    runner = DecodeRunner(fast, config)
    for prompts in (SMOL_PROMPTS[:1], SMOL_PROMPTS):
        rows = [tok.encode(p) for p in prompts]
        params = [DecodeParams(max_new_tokens=24, temperature=0.0)] * len(rows)
        ours, _ = generate(fast, tok, rows, params, runner=runner)
        assert tokens(ours) == hf_greedy(smol.hf, rows, 24, tok.pad_token_id, tok.eos_token_id)


# ------------------------------------------------------------------------- CUDA graphs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_graphs_match_the_eager_step(tiny_dir, gen, dtype):
    """Replayed graphs (batch 3 in bucket 4, KV buckets) give the eager static step's tokens, and
    in fp32 greedy the CPU reference loop's."""
    decoder, tok = load_decoder(str(tiny_dir), device="cuda", dtype=dtype)
    config = DecodeRunnerConfig(batch_sizes=(1, 2, 4, 8), max_len=48, seq_buckets=(16, 32))
    runner = DecodeRunner(decoder, config)
    runner.warmup()
    assert len(runner._graphs) == 4 * 3
    eager = DecodeRunner(decoder, DecodeRunnerConfig((1, 2, 4, 8), 48, (16, 32), True))
    for lengths, params in (((7, 3, 11), list(SAMPLED)), ((4,), [GREEDY]), ((9, 2), [GREEDY])):
        rows = rand_rows(gen, *lengths)
        ours, _ = generate(decoder, tok, rows, params, runner=runner)
        ref, _ = generate(decoder, tok, rows, params, runner=eager)
        assert tokens(ours) == tokens(ref)
        if dtype == torch.float32 and all(p.temperature == 0 for p in params):
            # greedy only: CUDA and CPU generators draw different noise for the same seed
            cpu, cpu_tok = load_decoder(str(tiny_dir))
            assert tokens(ours) == tokens(generate(cpu, cpu_tok, rows, params, static=False)[0])


@pytest.mark.gpu
def test_cuda_graph_capture_out_of_memory_names_the_setting(tiny_dir):
    decoder, _ = load_decoder(str(tiny_dir), device="cuda")
    with pytest.raises(RuntimeError, match="batch_sizes|max_len"):
        DecodeRunner(decoder, DecodeRunnerConfig(batch_sizes=(1, 2**22), max_len=128))


@pytest.mark.gpu
def test_cuda_graph_step_has_no_host_sync(tiny_dir, gen):
    """With sync debug mode set to error, a replayed step and its sampling never synchronise."""
    decoder, tok = load_decoder(str(tiny_dir), device="cuda", dtype=torch.bfloat16)
    runner = DecodeRunner(decoder, DecodeRunnerConfig(batch_sizes=(1, 2), max_len=32))
    runner.warmup()
    rows = rand_rows(gen, 5, 3)
    key_mask = torch.ones(2, 20, dtype=torch.bool, device="cuda")
    key_mask[1, :2] = False
    positions = (key_mask[:, :5].long().cumsum(-1) - 1).clamp_min(0)
    ids = torch.tensor([rows[0], [0, 0, *rows[1]]], device="cuda")
    runner.begin(2, 20, key_mask)
    logits = runner.prefill(decoder.embed(ids), positions)
    tok_ = logits.argmax(-1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            tok_ = runner.step(tok_).argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.slow
def test_smollm2_cuda_graphs_bf16_greedy():
    """SmolLM2 in bf16: graph replays give the eager static step's greedy tokens, batch of 3."""
    decoder, tok = load_decoder("smollm2", device="cuda", dtype=torch.bfloat16)
    rows = [tok.encode(p) for p in SMOL_PROMPTS[:3]]
    params = [DecodeParams(max_new_tokens=24, temperature=0.0)] * 3
    runner = DecodeRunner(decoder, DecodeRunnerConfig(batch_sizes=(1, 2, 4), max_len=128))
    runner.warmup()
    eager = DecodeRunner(decoder, DecodeRunnerConfig((1, 2, 4), 128, enforce_eager=True))
    ours, _ = generate(decoder, tok, rows, params, runner=runner)
    ref, _ = generate(decoder, tok, rows, params, runner=eager)
    assert tokens(ours) == tokens(ref)
