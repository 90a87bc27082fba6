"""The Engine end to end on the tiny bundle (real MiniLM encoder, tiny random decoder)."""

import json
import math
import shutil

import pytest
import torch
from dglm.engine import bundle as bundle_io
from dglm.engine.api import MIN_TEMPERATURE, GenerationParams
from dglm.engine.engine import Engine
from dglm.engine.probes import Control, Probe


def test_generate_outputs_in_order_with_timings(tiny_engine):
    prompts = ["The movie was", "I think that the food", "Prices are"]
    params = [
        GenerationParams(seed=1, max_new_tokens=5),
        GenerationParams(
            seed=2,
            max_new_tokens=7,
            num_samples=2,
            controls=(Control("sentiment", "positive", 20.0),),
        ),
        GenerationParams(seed=3, max_new_tokens=3, temperature=0.0),
    ]
    outs = tiny_engine.generate(prompts, params)
    assert [o.prompt for o in outs] == prompts
    assert [len(o.samples) for o in outs] == [1, 2, 1]
    for o, p in zip(outs, params, strict=True):
        for s in o.samples:
            assert 0 < len(s.token_ids) <= p.max_new_tokens
            assert s.finish_reason in ("stop", "length")
            assert s.latent.shape == (384,) and torch.isfinite(s.latent).all()
            assert s.text == tiny_engine.tokenizer.decode(s.token_ids)
        assert set(o.timings) >= {
            "encode",
            "diffusion",
            "prompt_generator",
            "prefill",
            "decode",
            "total",
        }
        assert all(v >= 0 for v in o.timings.values())
    # the latent sits on the √d sphere (fast guidance projects x̂0)
    assert math.isclose(float(outs[0].samples[0].latent.norm()), math.sqrt(384), rel_tol=1e-3)


def test_seeded_requests_reproducible_and_independent(tiny_engine):
    p = GenerationParams(
        seed=42, max_new_tokens=6, controls=(Control("sentiment", "negative", 10.0),)
    )
    alone = tiny_engine.generate(["The movie was"], p)[0].samples[0]
    batched = tiny_engine.generate(
        ["Something else entirely", "The movie was"],
        [GenerationParams(seed=7, max_new_tokens=4), p],
    )[1].samples[0]
    assert alone.token_ids == batched.token_ids
    torch.testing.assert_close(alone.latent, batched.latent, rtol=1e-4, atol=1e-4)


def test_guidance_moves_latents_toward_target(tiny_engine):
    """On the same seeds, guided latents score higher on the probe than unguided ones."""
    probe = tiny_engine.probes.probes["sentiment"]
    prompts = ["The movie was"] * 6
    base = [GenerationParams(seed=i, max_new_tokens=1) for i in range(6)]
    for mode in ("fast", "exact"):
        plain = tiny_engine.generate(prompts, base)
        pos = tiny_engine.generate(
            prompts,
            [
                GenerationParams(
                    seed=i,
                    max_new_tokens=1,
                    guidance_mode=mode,
                    controls=(Control("sentiment", "positive", 30.0),),
                )
                for i in range(6)
            ],
        )
        lat = lambda outs: torch.stack([o.samples[0].latent for o in outs])  # noqa: E731
        p_plain = torch.sigmoid(probe.logits(lat(plain)))[:, 0]
        p_pos = torch.sigmoid(probe.logits(lat(pos)))[:, 0]
        assert (p_pos > p_plain).all(), (mode, p_pos, p_plain)


@pytest.mark.parametrize(
    "prompts, params, field",
    [
        ([], GenerationParams(), "prompts"),
        (["ok", "  "], GenerationParams(), r"prompts\[1\]"),
        ("just a string", GenerationParams(), "prompts"),
        (
            ["ok"],
            GenerationParams(controls=(Control("toxicity", "low"),)),
            "unknown probe 'toxicity'",
        ),
        (["ok"], GenerationParams(controls=(Control("sentiment", "meh"),)), "not a label"),
        (["ok"], GenerationParams(max_new_tokens=10_000), "context"),
        (["ok", "\ud800"], GenerationParams(), r"prompts\[1\] is not valid UTF-8"),
        (["ok"], [None], r"params\[0\] must be a GenerationParams, got NoneType"),
        (["ok"], [{"seed": 1}], r"params\[0\] must be a GenerationParams, got dict"),
        (["ok"], "params", "params must be"),
        (["ok"], 3, "params must be"),
    ],
)
def test_bad_input_raises_before_model_work(tiny_engine, prompts, params, field):
    with pytest.raises(ValueError, match=field):
        tiny_engine.generate(prompts, params)
    # the engine stays usable
    assert tiny_engine.generate(["still works"], GenerationParams(seed=0, max_new_tokens=2))[
        0
    ].samples


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(num_samples=0), "num_samples"),
        (dict(temperature=1e-40), "temperature"),  # subnormal: every score ±inf
        (dict(temperature=MIN_TEMPERATURE / 2), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=False), "temperature"),
        (dict(controls=("sentiment",)), "controls"),
        (dict(cfg_scale=float("nan")), "cfg_scale"),
        (dict(seed=-1), "seed"),
        (dict(stop=("",)), "stop"),
        (dict(stop=""), "stop"),
        (dict(stop=("ok", "\udcff")), r"stop\[1\] is not valid UTF-8"),
        (dict(prompt_guidance=-1.0), "prompt_guidance"),
        (dict(prompt_guidance=float("nan")), "prompt_guidance"),
        # booleans are booleans: "no" is a non-empty string, which Python reads as true
        (dict(ignore_eos="no"), "ignore_eos"),
        (dict(ignore_eos=1), "ignore_eos"),
        (dict(ignore_eos=None), "ignore_eos"),
        # integers are integers: not a bool, not a float
        (dict(num_samples=True), "num_samples"),
        (dict(max_new_tokens=4.0), "max_new_tokens"),
        (dict(top_k=1.5), "top_k"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
        (dict(no_repeat_ngram_size=True), "no_repeat_ngram_size"),
        (dict(seed=True), "seed"),
        (dict(seed=3.0), "seed"),
        (dict(re_control_steps=False), "re_control_steps"),
        (dict(num_inference_steps=True), "num_inference_steps"),
        (dict(num_inference_steps=4.0), "num_inference_steps"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=10_001), "num_inference_steps"),
        (dict(sampler="euler"), "sampler"),
        (dict(guidance_mode="slow"), "guidance_mode"),
        (dict(renoise_alpha2=1.5), "renoise_alpha2"),
        (dict(renoise_alpha2="0.9"), "renoise_alpha2"),
        (dict(stop=5), "stop"),
    ],
)
def test_bad_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GenerationParams(**kwargs)


def test_stop_and_temperature_edges():
    assert GenerationParams(stop="the end").stop == ("the end",)  # one string, not its characters
    assert GenerationParams(stop=["a", "b"]).stop == ("a", "b")
    assert GenerationParams(temperature=0).temperature == 0  # greedy
    assert GenerationParams(temperature=MIN_TEMPERATURE).temperature == MIN_TEMPERATURE


def test_bad_sampler_override(tiny_engine):
    with pytest.raises(ValueError, match="num_inference_steps"):
        tiny_engine.generate(["x"], GenerationParams(num_inference_steps=0))


def test_good_params_keep_their_types():
    p = GenerationParams(ignore_eos=True, num_inference_steps=4, sampler="ddim", seed=0)
    assert p.ignore_eos is True and p.num_inference_steps == 4 and p.seed == 0


def test_wrong_dimension_probe_rejected(tiny_engine):
    with pytest.raises(ValueError, match="dimension 16"):
        tiny_engine.add_probe(Probe("bad", ("a", "b"), torch.randn(1, 16), torch.zeros(1)))
    assert "bad" not in tiny_engine.probes.probes


def test_save_and_reload_roundtrip(tiny_engine, tmp_path):
    tiny_engine.save_pretrained(tmp_path / "b")
    again = Engine.from_pretrained(tmp_path / "b")
    p = GenerationParams(seed=5, max_new_tokens=4, controls=(Control("sentiment", "positive"),))
    a = tiny_engine.generate(["The movie was"], p)[0].samples[0]
    b = again.generate(["The movie was"], p)[0].samples[0]
    assert a.token_ids == b.token_ids
    assert not list((tmp_path / "b").glob("*.bin")) and not list((tmp_path / "b").glob("*.pt"))


def test_cfg_and_steps_overrides(tiny_engine):
    out = tiny_engine.generate(
        ["The movie was"],
        GenerationParams(
            seed=1, max_new_tokens=2, cfg_scale=2.0, num_inference_steps=3, sampler="ddim"
        ),
    )
    assert len(out[0].samples) == 1


def test_missing_bundle_error():
    with pytest.raises(ValueError, match="no bundle"):
        Engine.from_pretrained("/nonexistent/bundle")


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def _edit_config(**changes):
    def edit(path):
        cfg = {**json.loads(path.read_text()), **changes}
        path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))

    return edit


@pytest.mark.parametrize(
    "name, damage, match",
    [
        (bundle_io.SCORE_NET_FILE, _truncate, "score_network.safetensors: not a readable"),
        (bundle_io.PROMPT_GEN_FILE, lambda p: p.write_bytes(b"{}"), "prompt_generator.safetensors"),
        (bundle_io.PROBES_FILE, _truncate, "probes.safetensors: not a readable probes file"),
        (bundle_io.PROBES_FILE, lambda p: p.unlink(), "probes.safetensors is missing"),
        (bundle_io.SCORE_NET_FILE, lambda p: p.unlink(), "score_network.safetensors is missing"),
        ("config.json", lambda p: p.write_text("{not json"), "config.json: not a readable JSON"),
        ("config.json", _edit_config(encoder=None), r"config.json: missing keys \['encoder'\]"),
        ("config.json", _edit_config(bogus=1), r"config.json: unknown keys \['bogus'\]"),
        ("config.json", _edit_config(sampler={"steps": 3}), "config.json: .*steps"),
        ("config.json", _edit_config(control_scale=1e7), "config.json: control_scale"),
    ],
)
def test_a_damaged_bundle_names_the_file(tiny_bundle, tmp_path, name, damage, match):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    damage(bundle / name)
    with pytest.raises(ValueError, match=match):
        Engine.from_pretrained(bundle)


def test_an_unavailable_device_is_refused(tiny_bundle):
    missing = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"device 'cuda:{missing}' is not available"):
        Engine.from_pretrained(tiny_bundle, device=f"cuda:{missing}")
    with pytest.raises(ValueError, match="device must name a torch device"):
        Engine.from_pretrained(tiny_bundle, device="gpu0")


@pytest.mark.gpu
def test_cuda_graph_sampler_matches_eager_on_gpu(tiny_bundle):
    eager = Engine.from_pretrained(tiny_bundle, device="cuda", cuda_graphs=False)
    graphs = Engine.from_pretrained(tiny_bundle, device="cuda")
    assert graphs.dglm.captured is not None
    p = [
        GenerationParams(
            seed=i, max_new_tokens=2, controls=(Control("sentiment", "positive", 10.0),)
        )
        for i in range(3)
    ]
    a = torch.stack([o.samples[0].latent for o in eager.generate(["The movie was"] * 3, p)])
    b = torch.stack([o.samples[0].latent for o in graphs.generate(["The movie was"] * 3, p)])
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_fast_decode_runner_matches_the_default_path(tiny_bundle):
    """fast_decode: a persistent runner (CPU: the fused step of the int8 decoder) — same greedy
    tokens, reused across calls, bypassed for batches past its buffers; on by default where the
    fused step serves the decoder, off when asked."""
    plain = Engine.from_pretrained(tiny_bundle, fast_decode=False)
    fast = Engine.from_pretrained(tiny_bundle, fast_decode=True)
    assert fast.info()["fast_decode"] and not plain.info()["fast_decode"]
    auto = Engine.from_pretrained(tiny_bundle)  # an int8 Llama decoder on CPU: fused, so on
    assert auto.info()["fast_decode"] and auto.decode_runner.fused is not None
    fp32 = Engine.from_pretrained(tiny_bundle, quantize="none")  # no fused step: off
    assert not fp32.info()["fast_decode"]
    prompts = ["The movie was", "A quick brown fox jumps over"]
    params = [GenerationParams(seed=i, max_new_tokens=6, temperature=0.0) for i in range(2)]
    ref, got = plain.generate(prompts, params), fast.generate(prompts, params)
    assert [o.samples[0].token_ids for o in got] == [o.samples[0].token_ids for o in ref]
    traced = set(fast.decode_runner._graphs)
    assert traced and all(b == 2 for b, _ in traced)  # the batch-2 bucket, made on first use
    fast.generate(prompts, params)
    assert set(fast.decode_runner._graphs) == traced  # reused, not re-traced
    many = fast.generate(["x"] * 33, GenerationParams(seed=0, max_new_tokens=2, temperature=0.0))
    assert len(many) == 33 and set(fast.decode_runner._graphs) == traced  # past the buffers


def test_a_control_without_a_scale_takes_the_bundles_control_scale(tiny_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    cfg = json.loads((bundle / "config.json").read_text())
    (bundle / "config.json").write_text(json.dumps({**cfg, "control_scale": 123.0}))
    engine = Engine.from_pretrained(bundle)
    assert engine.config.control_scale == 123.0

    def latent(scale):
        params = GenerationParams(
            seed=3, max_new_tokens=2, controls=(Control("sentiment", "positive", scale),)
        )
        return engine.generate(["Hello there"], params)[0].samples[0].latent

    torch.testing.assert_close(latent(None), latent(123.0))
    assert (latent(None) - latent(10.0)).abs().max() > 1e-4
    (bundle / "config.json").write_text(json.dumps({**cfg, "control_scale": -1.0}))
    with pytest.raises(ValueError, match="control_scale"):
        Engine.from_pretrained(bundle)


def test_prompt_guidance_per_request_and_bundle_default(tiny_bundle, tmp_path):
    """prompt_guidance: 1 (the default of a bundle without the setting) decodes as before; another
    scale, per request or as the bundle's default, guides the decoder with its soft prompt."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    engine = Engine.from_pretrained(bundle)
    assert engine.config.prompt_guidance == 1.0 and engine.config.prompt_plausibility == 0.1
    prompts = ["The movie was", "Prices are rising while"]

    def tokens(eng, **kw):
        params = [
            GenerationParams(seed=s, max_new_tokens=12, ignore_eos=True, **kw) for s in (4, 5)
        ]
        return [o.samples[0].token_ids for o in eng.generate(prompts, params)]

    plain = tokens(engine)
    assert tokens(engine, prompt_guidance=1.0) == plain
    guided = tokens(engine, prompt_guidance=4.0)
    assert guided != plain
    cfg = json.loads((bundle / "config.json").read_text())
    (bundle / "config.json").write_text(json.dumps({**cfg, "prompt_guidance": 4.0}))
    by_default = Engine.from_pretrained(bundle)
    assert tokens(by_default) == guided
    assert tokens(by_default, prompt_guidance=1.0) == plain
    (bundle / "config.json").write_text(json.dumps({**cfg, "prompt_plausibility": 1.5}))
    with pytest.raises(ValueError, match="prompt_plausibility"):
        Engine.from_pretrained(bundle)


def test_no_repeat_ngram_size_per_request_and_bundle_default(tiny_bundle, tmp_path):
    """no_repeat_ngram_size: off by default (tokens as before); per request or as the bundle's
    default, no sample repeats a token n-gram of its continuation; 0 turns a default off."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    engine = Engine.from_pretrained(bundle)
    assert engine.config.no_repeat_ngram_size == 0
    prompts = ["The movie was", "Prices are rising while"]

    def tokens(eng, **kw):
        params = [
            GenerationParams(seed=s, max_new_tokens=24, ignore_eos=True, temperature=0, **kw)
            for s in (4, 5)
        ]
        return [o.samples[0].token_ids for o in eng.generate(prompts, params)]

    def repeats(ids, n):
        grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
        return len(grams) != len(set(grams))

    plain = tokens(engine)
    assert tokens(engine, no_repeat_ngram_size=0) == plain
    assert any(repeats(ids, 2) for ids in plain)  # the tiny bundle loops greedily
    banned = tokens(engine, no_repeat_ngram_size=2)
    assert not any(repeats(ids, 2) for ids in banned) and banned != plain
    cfg = json.loads((bundle / "config.json").read_text())
    (bundle / "config.json").write_text(json.dumps({**cfg, "no_repeat_ngram_size": 2}))
    by_default = Engine.from_pretrained(bundle)
    assert tokens(by_default) == banned
    assert tokens(by_default, no_repeat_ngram_size=0) == plain
    # rows of one batch with different sizes each get their own
    mixed = by_default.generate(
        prompts,
        [GenerationParams(seed=4, max_new_tokens=24, ignore_eos=True, temperature=0),
         GenerationParams(seed=5, max_new_tokens=24, ignore_eos=True, temperature=0,
                          no_repeat_ngram_size=0)],
    )  # fmt: skip
    assert [o.samples[0].token_ids for o in mixed] == [banned[0], plain[1]]
