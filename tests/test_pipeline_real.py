"""The whole pipeline on the real models: MiniLM encoder and SmolLM2-135M decoder."""

import pytest
import torch
from dglm.engine.api import GenerationParams
from dglm.engine.engine import Engine
from dglm.engine.probes import Control

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_engine(tmp_path_factory, sentiment_probe):
    from dglm.engine.bundle import resolve_bundle_dir

    try:
        return Engine.from_pretrained(resolve_bundle_dir("default"))
    except ValueError:  # no default bundle shipped yet: real encoder/decoder, untrained networks
        from dglm.engine.training.builder import create_bundle

        out = tmp_path_factory.mktemp("real_bundle")
        create_bundle(out, "all-MiniLM-L6-v2", "smollm2", "small", "small", [sentiment_probe])
        return Engine.from_pretrained(out)


def test_real_pipeline_generates_with_controls(real_engine):
    assert real_engine.encoder.dim == 384 and real_engine.decoder.hidden_size == 576
    prompts = ["The movie was", "The food at this place"]
    params = [
        GenerationParams(
            seed=0, max_new_tokens=12, controls=(Control("sentiment", "positive", 10.0),)
        ),
        GenerationParams(seed=1, max_new_tokens=12, temperature=0.0, stop=(".",)),
    ]
    outs = real_engine.generate(prompts, params)
    assert [o.prompt for o in outs] == prompts
    for o in outs:
        s = o.samples[0]
        assert s.token_ids and s.text == real_engine.tokenizer.decode(s.token_ids)[: len(s.text)]
        assert all(t < real_engine.decoder.vocab_size for t in s.token_ids)
        assert o.timings["decode"] > 0 and o.timings["diffusion"] > 0
    assert "." not in outs[1].samples[0].text


def test_real_pipeline_guidance_raises_probe_score(real_engine):
    probe = real_engine.probes.probes["sentiment"]
    n = 4
    for target, sign in (("positive", 1.0), ("negative", -1.0)):
        plain = real_engine.generate(
            ["The movie was"] * n, [GenerationParams(seed=i, max_new_tokens=1) for i in range(n)]
        )
        guided = real_engine.generate(
            ["The movie was"] * n,
            [
                GenerationParams(
                    seed=i, max_new_tokens=1, controls=(Control("sentiment", target, 20.0),)
                )
                for i in range(n)
            ],
        )
        lat = lambda outs: torch.stack([o.samples[0].latent for o in outs])  # noqa: E731
        delta = probe.logits(lat(guided))[:, 0] - probe.logits(lat(plain))[:, 0]
        assert (sign * delta > 0).all(), (target, delta)


def test_shipped_toxicity_value_network_composes_with_dglm(real_engine):
    """The default bundle's toxicity value network (run 7 of its TRAINING.md): it rates a
    profane sentence above a polite one on the decoder's own states, and a request of two
    controls (sentiment through DGLM, toxicity through RE-Control) is edited, while a DGLM-only
    row beside it decodes exactly as it does alone."""
    nets = real_engine.value_nets
    assert {"sentiment", "toxicity"} <= set(nets)
    tok, dec = real_engine.tokenizer, real_engine.decoder

    def value(text: str) -> float:  # the predicted toxicity logit at the text's last state
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            h = dec.hidden_states(dec.embed(ids), torch.arange(ids.shape[1])[None])
            return float(nets["toxicity"](h[0, -1]))

    rude = ["You are a damn stupid idiot and this is crap.", "Shut up, you worthless moron."]
    polite = ["Thank you for the lovely dinner last night.", "The garden looks beautiful today."]
    assert min(map(value, rude)) > max(map(value, polite))

    negative = Control("sentiment", "negative")
    both = (negative, Control("toxicity", "low", method="re-control"))
    prompts = ["The food at this place", "The food at this place"]
    # the DGLM-only row without the bundle's implied toxicity=low (else it is the edited row)
    params = [
        GenerationParams(seed=3, max_new_tokens=16, controls=both),
        GenerationParams(seed=3, max_new_tokens=16, controls=(negative,), implied_controls=False),
    ]
    edited, plain = real_engine.generate(prompts, params)
    (alone,) = real_engine.generate(prompts[:1], params[1:])
    assert plain.samples[0].token_ids == alone.samples[0].token_ids
    assert edited.samples[0].token_ids != plain.samples[0].token_ids
