"""Our decoders against Hugging Face transformers: full, left-padded, cached and soft-prompt
forwards on tiny random models of every family, then the real SmolLM2 (slow)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from decoder_fixtures import (
    EOS,
    FAMILIES,
    PAD,
    SMOL_PROMPTS,
    VOCAB,
    Tiny,
    left_pad,
    make_tiny_hf_dir,
    mask_positions,
    one_thread,  # noqa: F401 - autouse fixture
    smollm2,
)
from dglm.engine.models import (
    GPT2Config,
    GPT2Decoder,
    KVCache,
    LlamaConfig,
    LlamaDecoder,
    load_decoder,
    loading,
)

TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory) -> Tiny:
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_hf_dir(request.param, path, seed=FAMILIES.index(request.param))
    _, tokenizer = load_decoder(str(path))
    return Tiny(request.param, path, hf.double(), tokenizer)


@pytest.fixture(scope="module")
def ours(tiny: Tiny):
    decoder, _ = load_decoder(str(tiny.path), dtype=torch.float32)
    return decoder


def hf_logits(hf, ids=None, embeds=None, mask=None, positions=None) -> torch.Tensor:
    with torch.no_grad():
        out = hf(
            input_ids=ids,
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
        )
    return out.logits.double()


def hf_embed(hf, ids: torch.Tensor) -> torch.Tensor:
    return hf.get_input_embeddings()(ids)


def rand_ids(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(4, VOCAB, shape, generator=gen)  # no special tokens


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ------------------------------------------------------------------------- tiny models vs HF


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_full_forward_matches_hf(tiny: Tiny, gen, dtype):
    decoder, _ = load_decoder(str(tiny.path), dtype=dtype)
    ids = rand_ids(gen, 3, 17)
    ref = hf_logits(tiny.hf, ids)
    positions = torch.arange(17).expand(3, 17)
    with torch.inference_mode():
        logits = decoder(decoder.embed(ids), positions)
        hidden = decoder.hidden_states(decoder.embed(ids), positions)
    assert logits.dtype == torch.float32 and logits.shape == (3, 17, VOCAB)
    if dtype == torch.float64:  # logits are returned in fp32: check the fp64 head product instead
        assert max_diff(hidden @ decoder.lm_head_weight().T, ref) < TOL[dtype]
    elif dtype == torch.bfloat16:
        hf_bf16 = copy.deepcopy(tiny.hf).to(torch.bfloat16)
        bound = 2 * max_diff(hf_logits(hf_bf16, ids), ref) + 1e-3
        assert max_diff(logits, ref) <= bound
    else:
        assert max_diff(logits, ref) < TOL[dtype]


def test_left_padding_with_key_mask(tiny: Tiny, ours, gen):
    rows = [rand_ids(gen, n).tolist() for n in (13, 6, 1, 9)]
    ids, mask = left_pad(rows, PAD)
    positions = mask_positions(mask)
    ref = hf_logits(tiny.hf, ids, mask=mask, positions=positions)
    with torch.inference_mode():
        logits = ours(ours.embed(ids), positions, key_mask=mask.bool())
    real = mask.bool()
    assert torch.isfinite(logits).all()
    assert max_diff(logits[real], ref[real]) < 1e-4
    # each row alone, without padding, gives the same logits
    for b, row in enumerate(rows):
        alone = ours(ours.embed(torch.tensor([row])), torch.arange(len(row))[None])
        assert max_diff(alone[0], logits[b, -len(row) :]) < 1e-4


@pytest.mark.parametrize("chunks", [(5, 1, 1, 1, 1, 1, 1), (3, 4, 1, 2, 3)])
def test_cached_decoding_matches_full_forward(tiny: Tiny, ours, gen, chunks):
    """Prefill, then chunks (token by token, or several at once) through the static cache."""
    rows = [rand_ids(gen, n).tolist() for n in (11, 7, 4)]
    ids, mask = left_pad(rows, PAD)
    B, T = ids.shape
    extra = rand_ids(gen, B, sum(chunks) - T)
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    positions = mask_positions(full_mask)
    ref = hf_logits(tiny.hf, full_ids, mask=full_mask, positions=positions)
    cache = ours.new_cache(B, sum(chunks) + 3)
    pieces, start = [], 0
    with torch.inference_mode():
        for n in chunks:
            sl = slice(start, start + n)
            km = full_mask[:, : start + n].bool()
            pieces.append(ours(ours.embed(full_ids[:, sl]), positions[:, sl], cache, km))
            start += n
            assert cache.length == start
    logits = torch.cat(pieces, 1)
    real = full_mask.bool()
    assert max_diff(logits[real], ref[real]) < 1e-4


def test_cached_decoding_without_padding(tiny: Tiny, ours, gen):
    """No key_mask: prefill, 3 tokens at an offset (explicit causal mask), then single tokens."""
    ids = rand_ids(gen, 2, 12)
    ref = hf_logits(tiny.hf, ids)
    cache = ours.new_cache(2, 12)
    positions = torch.arange(12).expand(2, 12)
    pieces, start = [], 0
    with torch.inference_mode():
        for n in (6, 3, 1, 1, 1):
            sl = slice(start, start + n)
            pieces.append(ours(ours.embed(ids[:, sl]), positions[:, sl], cache))
            start += n
    assert max_diff(torch.cat(pieces, 1), ref) < 1e-4


def test_gradients_to_inputs_embeds_match_hf(tiny: Tiny, gen):
    """The frozen decoder passes gradients to inputs_embeds (prompt-generator training), with
    left padding and a key mask."""
    decoder, _ = load_decoder(str(tiny.path), dtype=torch.float64)
    rows = [rand_ids(gen, n).tolist() for n in (8, 5)]
    ids, mask = left_pad(rows, PAD)
    positions = mask_positions(mask)
    weights = torch.randn(*ids.shape, VOCAB, generator=gen, dtype=torch.float64) * mask[..., None]
    x_ref = hf_embed(tiny.hf, ids).detach().requires_grad_(True)
    out = tiny.hf(inputs_embeds=x_ref, attention_mask=mask, position_ids=positions).logits
    (out * weights).sum().backward()
    x = decoder.embed(ids).detach().requires_grad_(True)
    hidden = decoder.hidden_states(x, positions, key_mask=mask.bool())
    (hidden @ decoder.lm_head_weight().T * weights).sum().backward()
    real = mask.bool()
    assert max_diff(x.grad[real], x_ref.grad[real]) < 1e-9
    assert not any(p.grad is not None for p in decoder.parameters())


def test_soft_prompt_in_the_middle(tiny: Tiny, ours, gen):
    """inputs_embeds = [prefix embeds; P arbitrary vectors; more token embeds], padded rows."""
    B, P = 3, 4
    rows = [rand_ids(gen, n).tolist() for n in (6, 3, 5)]
    ids, mask = left_pad(rows, PAD)
    after = rand_ids(gen, B, 5)
    soft = torch.randn(B, P, ours.hidden_size, generator=gen, dtype=torch.float64)
    full_mask = torch.cat([mask, torch.ones(B, P + 5, dtype=torch.long)], 1)
    positions = mask_positions(full_mask)
    ref_embeds = torch.cat([hf_embed(tiny.hf, ids), soft, hf_embed(tiny.hf, after)], 1)
    ref = hf_logits(tiny.hf, embeds=ref_embeds, mask=full_mask, positions=positions)
    real = full_mask.bool()
    with torch.inference_mode():
        x = torch.cat([ours.embed(ids), soft.float(), ours.embed(after)], 1)
        logits = ours(x, positions, key_mask=real)
        assert max_diff(logits[real], ref[real]) < 1e-4
        # the same through the cache: prefix + soft prompt, then the tokens one by one
        t0 = ids.shape[1] + P
        cache = ours.new_cache(B, x.shape[1])
        pieces = [ours(x[:, :t0], positions[:, :t0], cache, real[:, :t0])]
        for t in range(t0, x.shape[1]):
            pieces.append(ours(x[:, t : t + 1], positions[:, t : t + 1], cache, real[:, : t + 1]))
    cached = torch.cat(pieces, 1)
    assert max_diff(cached[real], ref[real]) < 1e-4


def test_last_only_and_hidden_states(ours, gen):
    ids = rand_ids(gen, 2, 9)
    positions = torch.arange(9).expand(2, 9)
    with torch.inference_mode():
        full = ours(ours.embed(ids), positions)
        last = ours(ours.embed(ids), positions, last_only=True)
        hidden = ours.hidden_states(ours.embed(ids), positions)
    assert last.shape == (2, 1, VOCAB)
    assert max_diff(last[:, 0], full[:, -1]) < 1e-6
    assert hidden.shape == (2, 9, ours.hidden_size)
    assert max_diff(ours.logits(hidden), full) < 1e-6


def test_decoder_attributes(tiny: Tiny, ours):
    assert ours.vocab_size == VOCAB and ours.max_context == 128 and ours.num_layers == 2
    assert ours.hidden_size == tiny.hf.config.hidden_size
    assert ours.eos_token_ids == (EOS,)
    assert tiny.tokenizer.eos_token_id == EOS
    assert not any(p.requires_grad for p in ours.parameters())
    cache = ours.new_cache(3, 20)
    assert cache.k.shape == (2, 3, ours.num_kv_heads, 20, ours.head_dim)
    assert cache.rows(2).k.data_ptr() == cache.k.data_ptr()


# ------------------------------------------------------------------------- errors and loading


def test_cache_errors(ours, gen):
    ids = rand_ids(gen, 2, 5)
    positions = torch.arange(5).expand(2, 5)
    with torch.inference_mode():
        cache = ours.new_cache(2, 6)
        ours(ours.embed(ids), positions, cache)
        with pytest.raises(ValueError, match="cache overflow"):
            ours(ours.embed(ids[:, :2]), positions[:, :2], cache)
        cache.reset()
        with pytest.raises(ValueError, match="rows"):
            ours(ours.embed(ids[:1]), positions[:1], cache)
        with pytest.raises(ValueError, match="key_mask"):
            ours(ours.embed(ids), positions, key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_len"):
        ours.new_cache(1, ours.max_context + 1)


def test_config_validation():
    ok = dict(vocab_size=10, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=4)
    assert LlamaConfig(**ok, num_kv_heads=2).head_dim == 4
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaConfig(**ok, num_kv_heads=3)
    with pytest.raises(ValueError, match="rope_type"):
        LlamaConfig(**ok, num_kv_heads=2, rope_type="yarn")
    with pytest.raises(ValueError, match="head_dim"):
        LlamaConfig(**ok, num_kv_heads=2, head_dim=5)
    with pytest.raises(ValueError, match="hidden_size"):
        GPT2Config(vocab_size=10, hidden_size=10, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match="activation"):
        GPT2Config(vocab_size=10, hidden_size=16, num_layers=1, num_heads=4, activation="tanh")
    assert (
        GPT2Config(vocab_size=10, hidden_size=16, num_layers=1, num_heads=4).intermediate_size == 64
    )
    # plain construction (random init) works for both families
    LlamaDecoder(LlamaConfig(**ok, num_kv_heads=2))
    GPT2Decoder(GPT2Config(vocab_size=10, hidden_size=16, num_layers=1, num_heads=4))


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert'"):
        load_decoder(str(tmp_path))


def test_unsupported_rope_type(tmp_path):
    from transformers import LlamaConfig as HFLlamaConfig

    cfg = HFLlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
    )
    with pytest.raises(ValueError, match="dynamic"):
        LlamaConfig.from_hf_config(cfg)


def test_bad_path_and_offline_hub_name(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="config.json"):
        load_decoder(str(tmp_path))  # a directory without a model
    with pytest.raises(ValueError, match="neither"):
        load_decoder(str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(RuntimeError, match="local directory|pass that directory"):
        load_decoder("some-org/not-a-cached-model")


def test_pytorch_model_bin_checkpoint(tiny: Tiny, ours, tmp_path, gen):
    """A directory with pytorch_model.bin (loaded with weights_only=True) instead of safetensors."""
    import shutil

    from safetensors.torch import load_file

    for f in tiny.path.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    torch.save(load_file(tiny.path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    decoder, _ = load_decoder(str(tmp_path))
    ids = rand_ids(gen, 1, 8)
    positions = torch.arange(8)[None]
    with torch.inference_mode():
        assert (
            max_diff(decoder(decoder.embed(ids), positions), ours(ours.embed(ids), positions)) == 0
        )


def test_gguf_conversion_is_cached_and_atomic(tmp_path, monkeypatch):
    """One conversion per file; an incomplete target directory is replaced, never used."""
    monkeypatch.setenv("DGLM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"fake")
    calls = []

    def fake_convert(src, out):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert_gguf", fake_convert)
    target = tmp_path / "cache" / "decoders" / "model-4"
    target.mkdir(parents=True)  # an incomplete directory from an interrupted run
    first = loading.converted_gguf_dir(gguf)
    second = loading.converted_gguf_dir(gguf)
    assert first == second == target and len(calls) == 1
    assert calls[0] != target  # written elsewhere, then renamed into place
    assert (target / "config.json").is_file()
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]


def test_kvcache_is_a_plain_dataclass():
    cache = KVCache(torch.zeros(1, 2, 1, 4, 2), torch.zeros(1, 2, 1, 4, 2), 3)
    assert (cache.batch_size, cache.max_len, cache.length) == (2, 4, 3)
    cache.reset()
    assert cache.length == 0


# ------------------------------------------------------------------------- forward_static


def static_inputs(ours, gen, lengths=(9, 4, 6), steps=6, spare=3):
    """Left-padded rows + `steps` more tokens: (embeds (B, N, H), positions (B, N), real mask
    (B, N) bool, T0, S), S = N + spare KV slots."""
    rows = [rand_ids(gen, n).tolist() for n in lengths]
    ids, mask = left_pad(rows, PAD)
    T0 = ids.shape[1]
    extra = rand_ids(gen, len(rows), steps)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    x = ours.embed(torch.cat([ids, extra], 1))
    return x, mask_positions(full_mask), full_mask.bool(), T0, x.shape[1] + spare


def junk_cache(ours, B, S, gen, dtype=torch.float32):
    """KV buffers full of finite junk: forward_static must never read an unwritten slot."""
    shape = (ours.num_layers, B, ours.num_kv_heads, S, ours.head_dim)
    return (
        torch.randn(shape, generator=gen).to(dtype),
        torch.randn(shape, generator=gen).to(dtype),
    )


def static_run(ours, x, positions, real, T0, S, k, v, chunks):
    """Prefill T0 slots, then `chunks` (token counts) through forward_static in place."""
    B, N, _ = x.shape
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[:, :N] = real
    pieces, start = [], 0
    for n in (T0, *chunks):
        sl = slice(start, start + n)
        write_pos = torch.arange(start, start + n)
        pieces.append(ours.forward_static(x[:, sl], positions[:, sl], k, v, write_pos, key_mask))
        start += n
    return torch.cat(pieces, 1)  # (B, N, V)


@pytest.mark.parametrize("chunks", [(1, 1, 1, 1, 1, 1), (2, 1, 3)])
def test_forward_static_matches_forward(tiny: Tiny, ours, gen, chunks):
    """Prefill + decode steps (and multi-token chunks) with left padding, in place, over junk-
    filled buffers: the logits of every real token equal the plain forward's (< 1e-5, fp32), and
    pad queries stay finite."""
    x, positions, real, T0, S = static_inputs(ours, gen, steps=sum(chunks))
    k, v = junk_cache(ours, x.shape[0], S, gen)
    with torch.inference_mode():
        ref = ours(x, positions, key_mask=real)
        logits = static_run(ours, x, positions, real, T0, S, k, v, chunks)
    assert torch.isfinite(logits).all()
    assert max_diff(logits[real], ref[real]) < 1e-5
    # and the same through forward with a KVCache, token by token (the generate reference)
    cache = ours.new_cache(x.shape[0], S)
    with torch.inference_mode():
        cached = [ours(x[:, :T0], positions[:, :T0], cache, real[:, :T0])]
        for t in range(T0, x.shape[1]):
            cached.append(ours(x[:, t : t + 1], positions[:, t : t + 1], cache, real[:, : t + 1]))
    assert max_diff(torch.cat(cached, 1)[real], logits[real]) < 1e-5
    written = slice(0, x.shape[1])
    assert max_diff(cache.k[:, :, :, written], k[:, :, :, written]) < 1e-5


def test_forward_static_last_only_and_gap(ours, gen):
    """last_only gives the last position's logits; a skipped slot masked off in key_mask changes
    nothing (write slots need not be contiguous)."""
    x, positions, real, T0, S = static_inputs(ours, gen, lengths=(5, 3), steps=2, spare=2)
    B, N, _ = x.shape
    k, v = junk_cache(ours, B, S, gen)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[:, :N] = real
    with torch.inference_mode():
        full = ours.forward_static(x[:, :T0], positions[:, :T0], k, v, torch.arange(T0), key_mask)
        last = ours.forward_static(
            x[:, :T0], positions[:, :T0], k, v, torch.arange(T0), key_mask, last_only=True
        )
        assert last.shape == (B, 1, ours.vocab_size)
        assert max_diff(last, full[:, -1:]) < 1e-6
        step = ours.forward_static(
            x[:, T0 : T0 + 1], positions[:, T0 : T0 + 1], k, v, torch.tensor([T0]), key_mask
        )
        gap_mask = key_mask.clone()
        gap_mask[:, T0] = False  # slot T0 left unwritten, the token goes to T0 + 1
        k2, v2 = junk_cache(ours, B, S, gen)
        ours.forward_static(x[:, :T0], positions[:, :T0], k2, v2, torch.arange(T0), gap_mask)
        gapped = ours.forward_static(
            x[:, T0 : T0 + 1], positions[:, T0 : T0 + 1], k2, v2, torch.tensor([T0 + 1]), gap_mask
        )
    assert max_diff(gapped, step) < 1e-5


def test_forward_static_bf16_within_own_error(tiny: Tiny, gen):
    """bf16 static steps vs the fp64 reference, judged by the bf16 plain forward's own error."""
    decoder, _ = load_decoder(str(tiny.path), dtype=torch.bfloat16)
    ref64, _ = load_decoder(str(tiny.path), dtype=torch.float64)
    x, positions, real, T0, S = static_inputs(ref64, gen, steps=3)
    k, v = junk_cache(decoder, x.shape[0], S, gen, torch.bfloat16)
    with torch.inference_mode():
        ref = ref64.hidden_states(x, positions, key_mask=real) @ ref64.lm_head_weight().T
        plain = decoder(x.bfloat16(), positions, key_mask=real)
        static = static_run(decoder, x.bfloat16(), positions, real, T0, S, k, v, (1, 1, 1))
    bound = 2 * max_diff(plain[real], ref[real]) + 1e-3
    assert max_diff(static[real], ref[real]) <= bound


def test_input_major_weights(tiny: Tiny, ours, gen):
    """use_input_major_weights: every Linear (and a tied head) becomes the transpose of a
    contiguous (in, out) array; logits stay within fp32 reordering error, plain and static."""
    fast, _ = load_decoder(str(tiny.path))
    assert fast.use_input_major_weights() is fast
    linears = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert all(w.t().is_contiguous() and not w.is_contiguous() for w in linears)
    assert fast.lm_head_weight().t().is_contiguous()
    assert not any(p.requires_grad for p in fast.parameters())
    x, positions, real, T0, S = static_inputs(ours, gen, steps=3)
    k, v = junk_cache(ours, x.shape[0], S, gen)
    k2, v2 = k.clone(), v.clone()
    with torch.inference_mode():
        ref = ours(x, positions, key_mask=real)
        assert max_diff(fast(x, positions, key_mask=real)[real], ref[real]) < 1e-5
        a = static_run(ours, x, positions, real, T0, S, k, v, (1, 1, 1))
        b = static_run(fast, x, positions, real, T0, S, k2, v2, (1, 1, 1))
    assert max_diff(a[real], b[real]) < 1e-5


def test_forward_static_shape_errors(ours):
    B, S = 2, 8
    k, v = junk_cache(ours, B, S, torch.Generator().manual_seed(0))
    x = torch.zeros(B, 1, ours.hidden_size)
    pos, wp, km = torch.zeros(B, 1, dtype=torch.long), torch.tensor([3]), torch.ones(B, S).bool()
    with pytest.raises(ValueError, match="k_cache"):
        ours.forward_static(x, pos, k[:, :1], v[:, :1], wp, km)
    with pytest.raises(ValueError, match="write_pos"):
        ours.forward_static(x, pos, k, v, torch.tensor([3, 4]), km)
    with pytest.raises(ValueError, match="key_mask"):
        ours.forward_static(x, pos, k, v, wp, km[:, :4])


# ------------------------------------------------------------------------- SmolLM2 (real weights)


@pytest.mark.slow
def test_smollm2_logits_match_hf():
    smol = smollm2()
    tok, dec = smol.tokenizer, smol.decoder
    rows = [tok.encode(p) for p in SMOL_PROMPTS]
    ids, mask = left_pad(rows, tok.pad_token_id)
    positions = mask_positions(mask)
    with torch.inference_mode():
        ref = smol.hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        logits = dec(dec.embed(ids), positions, key_mask=mask.bool())
    real = mask.bool()
    assert max_diff(logits[real], ref[real]) < 1e-4


@pytest.mark.slow
def test_smollm2_cached_greedy_matches_hf_generate():
    """16 greedy steps through our static cache give HF generate's tokens."""
    smol = smollm2()
    dec = smol.decoder
    ids = torch.tensor([smol.tokenizer.encode(SMOL_PROMPTS[1])])
    T, n = ids.shape[1], 16
    with torch.inference_mode():
        ref = smol.hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=smol.tokenizer.pad_token_id,
        )[0, T:].tolist()
        cache = dec.new_cache(1, T + n)
        logits = dec(dec.embed(ids), torch.arange(T)[None], cache, last_only=True)
        tokens = []
        for t in range(n):
            tokens.append(int(logits[0, -1].argmax()))
            if t + 1 < n:
                nxt = torch.tensor([[tokens[-1]]])
                logits = dec(dec.embed(nxt), torch.tensor([[T + t]]), cache)
    assert tokens == ref
