"""Diffusion-LM on a tiny config: training loss falls and resumes, length control, infilling's
fixed tokens, classifier guidance, seeds, the bundle, bad values refused by field."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from dglm.engine.api import GenerationParams
from dglm.engine.methods.diffusion_lm import (
    DIFFUSION_LM_PRESETS,
    Control,
    DiffusionLMEngine,
    DiffusionLMNetwork,
    DiffusionLMParams,
    LatentClassifier,
    LatentClassifierConfig,
)
from dglm.engine.methods.diffusion_lm.bundle import load_bundle, save_bundle
from dglm.engine.methods.diffusion_lm.method import DiffusionLM, plan_row
from dglm.engine.methods.diffusion_lm.sampling import ClassifierGuidance, ClassifierTerm
from dglm.engine.methods.diffusion_lm.vocab import BOS, EOS, FIRST_WORD, PAD, Vocab, words
from dglm.engine.training.diffusion_lm import (
    build_vocab,
    encode_sentences,
    labelled_sentences,
    read_sentences,
    split_sentences,
    train_diffusion_lm,
    train_latent_classifier,
)
from dglm.engine.training.loop import TrainConfig

POSITIVE = [
    "the movie was great .",
    "i loved the story .",
    "the food was good .",
    "a great fun film .",
]
NEGATIVE = [
    "the movie was bad .",
    "i hated the story .",
    "the food was awful .",
    "a sad dull film .",
]
SENTENCES = (POSITIVE + NEGATIVE) * 12


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_run(out, steps: int, sentences=SENTENCES):
    torch.manual_seed(0)
    vocab = build_vocab(sentences, 64, 12)
    config = replace(DIFFUSION_LM_PRESETS["tiny"], vocab_size=len(vocab))
    ids, _ = encode_sentences(sentences, vocab, config.seq_len)
    cfg = TrainConfig(
        steps=steps, batch_size=32, lr=3e-3, warmup=10, eval_every=20, save_every=20, ema_decay=0.9
    )
    net = DiffusionLMNetwork(config)
    return train_diffusion_lm(net, vocab, ids, ids[:16], out, cfg), vocab


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("dlm")
    path, _ = tiny_run(out, 200)
    return path


@pytest.fixture(scope="module")
def engine(bundle):
    return DiffusionLMEngine.from_pretrained(bundle)


def test_training_loss_falls_and_is_logged(bundle):
    rows = [json.loads(x) for x in (bundle.parent / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(20, 201, 20))
    for key in ("eval_loss", "eval_mse", "eval_nll", "eval_round_err", "eval_x0_err_t0.5",
                "eval_x0_word_err_t0.5"):  # fmt: skip
        assert key in rows[-1]
    assert rows[-1]["eval_loss"] < 0.7 * rows[0]["eval_loss"]
    assert rows[-1]["eval_round_err"] == 0.0  # the learned embeddings are decodable


def test_resume_continues_the_step_count(tmp_path):
    tiny_run(tmp_path, 20)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 20
    tiny_run(tmp_path, 40)
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 40


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddpm", 50)])
def test_length_control_is_exact(engine, sampler, steps):
    for length in (3, 5, 7):
        params = DiffusionLMParams(
            length=length, seed=3, num_samples=4, sampler=sampler, num_inference_steps=steps
        )
        for out in engine.generate(["", "the movie"], params):
            given = len(words(out.prompt))
            for s in out.samples:
                assert len(s.token_ids) == length - given
                assert all(i >= FIRST_WORD for i in s.token_ids)
                assert s.finish_reason == "stop"
                assert len(words(out.prompt + s.text)) == length


def test_infilling_never_changes_the_fixed_tokens(engine):
    left, right = "the", "was great ."
    params = DiffusionLMParams(
        infill=f"{left} ___ {right}", length=6, seed=0, num_samples=8, num_inference_steps=10
    )
    vocab = engine.vocab
    for s in engine.generate([""], params)[0].samples:
        ids = s.token_ids
        assert len(ids) == 6
        assert ids[:1] == vocab.encode(left) and ids[-3:] == vocab.encode(right)
        got = words(s.text)
        assert got[:1] == words(left) and got[-3:] == words(right)
    # unknown context words are kept as written, never rounded
    out = engine.generate([""], DiffusionLMParams(infill="zebra ___ .", length=4, seed=1))[0]
    assert words(out.text)[0] == "zebra" and words(out.text)[-1] == "."


def test_layout_of_length_and_infill(engine):
    vocab = engine.vocab
    plan = plan_row(vocab, 12, "the", DiffusionLMParams(infill=("", "."), length=5), 0)
    assert plan.fixed == [True, True, False, False, False, True, True] + [True] * 5
    assert plan.ids[0] == BOS and plan.ids[6] == EOS and plan.ids[7:] == [PAD] * 5
    assert plan.word_only[2:5] == [True] * 3 and plan.first == 2
    free = plan_row(vocab, 12, "", DiffusionLMParams(), 0)
    assert free.fixed == [True] + [False] * 11 and not any(free.word_only)


def test_same_seed_same_output_whatever_the_batch(engine):
    p = DiffusionLMParams(seed=11, num_inference_steps=12)
    alone = engine.generate([""], p)[0].samples[0]
    again = engine.generate([""], p)[0].samples[0]
    assert alone.token_ids == again.token_ids
    batch = engine.generate(
        ["the", "", "a"],
        [
            DiffusionLMParams(seed=5, num_inference_steps=12),
            p,
            DiffusionLMParams(seed=7, num_inference_steps=12),
        ],
    )
    assert batch[1].samples[0].token_ids == alone.token_ids
    # samples of a request use seed + index: sample 1 of seed 10 is sample 0 of seed 11
    two = engine.generate([""], DiffusionLMParams(seed=10, num_samples=2, num_inference_steps=12))
    assert two[0].samples[1].token_ids == alone.token_ids


def test_candidates_select_one_of_their_own_samples(engine, tiny_llama_dir):
    from dglm.engine.methods.diffusion_lm.method import CANDIDATE_SEED_STRIDE, mbr_index

    method = engine.method
    one = DiffusionLMParams(seed=3, num_inference_steps=8, length=6)
    # candidates = 1 is the plain sample (no scorer needed)
    assert (
        engine.generate([""], replace(one, candidates=1))[0].samples
        == engine.generate([""], one)[0].samples
    )
    # candidate c of sample j is the plain sample of seed + j + c·stride
    pool = [
        engine.generate([""], replace(one, seed=3 + 1 + c * CANDIDATE_SEED_STRIDE))[0].samples[0]
        for c in range(4)
    ]
    texts = [x.text for x in pool]
    assert len(set(texts)) > 1  # the candidates differ (a stride torch's seeding drops would not)
    out = engine.generate([""], replace(one, num_samples=2, candidates=4, select="mbr"))[0]
    assert out.samples[1].text == texts[mbr_index(texts)] and "select" in out.timings
    # "lm": the lowest per-token NLL under the scorer, here a tiny Llama
    monkey = method.scorer, method._scorer
    method.scorer, method._scorer = str(tiny_llama_dir), None
    try:
        nll = method.lm_nll([""] * 4, texts)
        got = engine.generate([""], replace(one, num_samples=2, candidates=4, select="lm"))[0]
        assert got.samples[1].text == texts[min(range(4), key=nll.__getitem__)]
        assert method.lm_nll(["", ""], ["", "   "]) == [float("inf")] * 2
    finally:
        method.scorer, method._scorer = monkey


def lattice_score(dec, prefix, words_, priors, tokens_of, weight):
    """A path's lattice score the slow way: one forward of the whole token sequence."""
    from dglm.engine.evaluation.perplexity import continuation_nll

    ids, prev = [], None
    for w in words_:
        ids += tokens_of(prev, w)
        prev = w
    nll, _ = continuation_nll(dec, [prefix], [ids])
    return -float(nll[0]) + weight * sum(priors)


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_lattice_beam_search_finds_the_best_path(tiny_llama_dir, weight):
    import itertools

    from dglm.engine.methods.diffusion_lm.lattice import Slot, beam_search
    from dglm.engine.models import load_decoder

    dec, tok = load_decoder(str(tiny_llama_dir))

    def tokens_of(prev, w):  # multi-token words and a context-dependent space
        return tok.encode(w if prev is None or w == "." else " " + w, add_special_tokens=False)

    table = [["the"], ["food", "movie", "tea"], ["was", "is"], ["very", "a", "so"], ["good", "bad"], ["."]]  # fmt: skip
    priors = [[0.0], [-0.1, -1.2, -2.3], [-0.7, -0.7], [-0.3, -1.6, -2.0], [-0.5, -0.9], [0.0]]
    slots = [
        Slot(tuple((w, 10 * k + i, pr) for i, (w, pr) in enumerate(zip(ws, ps, strict=True))))
        for k, (ws, ps) in enumerate(zip(table, priors, strict=True))
    ]
    prefix = [tok.eos_token_id]
    best = max(
        itertools.product(*[range(len(ws)) for ws in table]),
        key=lambda c: lattice_score(
            dec, prefix, [table[k][i] for k, i in enumerate(c)],
            [priors[k][i] for k, i in enumerate(c)], tokens_of, weight,
        ),
    )  # fmt: skip
    path, score = beam_search(dec, prefix, slots, tokens_of, 64, weight)  # beam ≥ every path
    assert path == [10 * k + i for k, i in enumerate(best)]
    words_ = [table[k][i] for k, i in enumerate(best)]
    want = lattice_score(dec, prefix, words_, [priors[k][i] for k, i in enumerate(best)],
                         tokens_of, weight)  # fmt: skip
    assert score == pytest.approx(want, abs=1e-3)
    # beam 1 is greedy: its score is never above the exact search's
    _, greedy = beam_search(dec, prefix, slots, tokens_of, 1, weight)
    assert greedy <= score + 1e-6
    with pytest.raises(ValueError, match="beam"):
        beam_search(dec, prefix, slots, tokens_of, 0, weight)


def test_lattice_pruning_by_the_first_token_bound_changes_nothing(tiny_llama_dir, monkeypatch):
    """Only the expansions whose first-token bound could still enter the beam are run through
    the decoder; with the smallest first batch (forcing the doubling) the result is the same as
    running every expansion."""
    from dglm.engine.methods.diffusion_lm import lattice
    from dglm.engine.models import load_decoder

    dec, tok = load_decoder(str(tiny_llama_dir))

    def tokens_of(prev, w):
        return tok.encode(w if prev is None else " " + w, add_special_tokens=False)

    vocab_ = ["the", "food", "movie", "tea", "was", "is", "very", "good", "bad", "story", "fun"]
    g = torch.Generator().manual_seed(0)
    slots = [
        lattice.Slot(tuple((w, i, -float(torch.rand((), generator=g))) for i, w in enumerate(vocab_)))
        for _ in range(4)
    ]  # fmt: skip
    for beam in (1, 2, 3):
        monkeypatch.setattr(lattice, "PRUNE_FACTOR", 10_000)  # every expansion, every step
        want = lattice.beam_search(dec, [tok.eos_token_id], slots, tokens_of, beam, 0.5)
        monkeypatch.setattr(lattice, "PRUNE_FACTOR", 1)
        monkeypatch.setattr(lattice, "PRUNE_MIN", 1)
        got = lattice.beam_search(dec, [tok.eos_token_id], slots, tokens_of, beam, 0.5)
        assert got[0] == want[0] and got[1] == pytest.approx(want[1], abs=1e-9)


def test_lattice_paths_never_repeat_a_word_pair_unless_forced(tiny_llama_dir):
    from dglm.engine.methods.diffusion_lm.lattice import Slot, beam_search
    from dglm.engine.models import load_decoder

    dec, tok = load_decoder(str(tiny_llama_dir))

    def tokens_of(prev, w):
        return tok.encode(w if prev is None else " " + w, add_special_tokens=False)

    a, dot, b = ("a", 0, 0.0), (".", 1, 0.0), ("b", 2, -50.0)  # the prior wants "a" (weight 100)
    slots = [Slot((a,)), Slot((dot,)), Slot((a, b)), Slot((dot,)), Slot((a, b))]
    path, _ = beam_search(dec, [tok.eos_token_id], slots, tokens_of, 1, 100.0)
    assert path == [0, 1, 0, 1, 2]  # greedy: "a . a ." then "b", a second ". a" is refused
    path, _ = beam_search(dec, [tok.eos_token_id], slots, tokens_of, 4, 100.0)
    pairs = list(zip([None, *path[:-1]], path, strict=True))
    assert path.count(2) == 1 and len(set(pairs)) == len(pairs)  # one "b", no pair twice
    # a slot whose every option repeats a pair still takes one (fixed words may have to)
    path, _ = beam_search(dec, [tok.eos_token_id], slots[:4] + [Slot((a,))], tokens_of, 1, 100.0)
    assert path == [0, 1, 0, 1, 0]


def test_lattice_select_keeps_the_layout_and_the_candidates_words(engine, tiny_llama_dir):
    from dglm.engine.methods.diffusion_lm.method import CANDIDATE_SEED_STRIDE

    method = engine.method
    one = DiffusionLMParams(seed=5, num_inference_steps=8, infill=("the", "."), length=5)
    pool = [
        engine.generate([""], replace(one, seed=5 + c * CANDIDATE_SEED_STRIDE))[0].samples[0]
        for c in range(6)
    ]
    monkey = method.scorer, method._scorer
    method.scorer, method._scorer = str(tiny_llama_dir), None
    try:
        p = replace(one, candidates=6, select="lattice", lattice_beam=64)
        out = engine.generate([""], p)[0].samples[0]
        again = engine.generate([""], p)[0].samples[0]
    finally:
        method.scorer, method._scorer = monkey
    assert out == again  # same seed, same output
    ws = words(out.text)
    assert len(ws) == 5 and ws[0] == "the" and ws[-1] == "."  # length and context kept
    for q in range(1, 4):  # every gap word is one a candidate put at that position
        assert out.token_ids[q] in {c.token_ids[q] for c in pool}
    assert len(out.token_ids) == 5 and out.finish_reason == "stop"


def test_mbr_picks_the_consensus():
    from dglm.engine.methods.diffusion_lm.method import mbr_index, overlap

    texts = ["the tea is good", "the tea is very good", "zebra quantum fog", "the tea was good"]
    assert mbr_index(texts) in (0, 1, 3) and mbr_index(texts) != 2
    assert overlap("a b c", "a b c") == 0.0 and overlap("a b c", "x y z") < 0
    assert mbr_index(["same", "same"]) == 0  # ties: the first


def test_generation_params_accepted(engine):
    out = engine.generate(
        [""], GenerationParams(seed=2, num_samples=2, num_inference_steps=8, sampler="ddim")
    )
    assert len(out[0].samples) == 2
    with pytest.raises(ValueError, match="sampler"):
        engine.generate([""], GenerationParams(sampler="dpmpp-2m"))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"length": 0}, "length"),
        ({"length": 11}, "length"),  # BOS + 11 words + EOS > 12 positions
        ({"infill": "no gap here"}, "infill"),
        ({"infill": ("a b c d", "e f"), "length": 6}, "length"),
        ({"sampler": "euler"}, "sampler"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"fluency": -1.0}, "fluency"),
        ({"fluency": float("nan")}, "fluency"),
        ({"guidance_steps": -1}, "guidance_steps"),
        ({"guidance_step_size": float("inf")}, "guidance_step_size"),
        ({"num_samples": 0}, "num_samples"),
        ({"seed": -3}, "seed"),
        ({"controls": (Control("sentiment", "positive"),)}, "controls"),
        ({"clamp": "yes"}, "clamp"),
        ({"candidates": 0}, "candidates"),
        ({"candidates": 1.5}, "candidates"),
        ({"select": "best"}, "select"),
        ({"select": "lattice", "candidates": 4}, "select"),  # no known length
        ({"length": 6, "lattice_beam": 0}, "lattice_beam"),
        ({"length": 6, "lattice_weight": float("nan")}, "lattice_weight"),
    ],
)
def test_bad_values_refused_by_field(engine, kwargs, field):
    with pytest.raises(ValueError, match=field):
        engine.generate([""], DiffusionLMParams(**kwargs))


def test_bad_prompts_refused(engine):
    with pytest.raises(ValueError, match="prompts"):
        engine.generate([], DiffusionLMParams())
    with pytest.raises(ValueError, match="prompts"):
        engine.generate([3], DiffusionLMParams())


def test_classifier_guidance_composes_and_leaves_other_rows_alone(tmp_path, bundle):
    net, vocab, _, _ = load_bundle(bundle)
    texts = POSITIVE * 6 + NEGATIVE * 6
    labels = ["positive"] * 24 + ["negative"] * 24
    sets = labelled_sentences(texts, labels, ("negative", "positive"), vocab, 12)
    config = LatentClassifierConfig(
        "sentiment", ("negative", "positive"), 8, 12, dim=32, depth=1, head_dim=16
    )
    cfg = TrainConfig(steps=60, batch_size=16, lr=3e-3, warmup=5, eval_every=30, save_every=30)
    torch.manual_seed(0)
    clf = train_latent_classifier(
        LatentClassifier(config), net, sets["train"], sets["eval"], tmp_path / "clf", cfg
    )
    out = save_bundle(tmp_path / "b", net, vocab, [clf], {"num_inference_steps": 10})
    eng = DiffusionLMEngine.from_pretrained(out)
    plain = DiffusionLMParams(seed=4, num_inference_steps=10)
    guided = DiffusionLMParams(
        seed=4,
        num_inference_steps=10,
        length=5,
        infill=("the", "."),
        controls=(Control("sentiment", "negative", scale=2.0),),
    )
    both = eng.generate(["", ""], [plain, guided])
    assert both[0].samples[0].token_ids == eng.generate([""], plain)[0].samples[0].token_ids
    ids = both[1].samples[0].token_ids
    assert len(ids) == 5 and ids[0] == vocab.index["the"] and ids[-1] == vocab.index["."]
    assert eng.default_params().num_inference_steps == 10
    with pytest.raises(ValueError, match="target"):
        eng.generate([""], DiffusionLMParams(controls=(Control("sentiment", "neutral"),)))


def test_guidance_step_is_adagrad_on_the_paper_loss(gen):
    """One Adagrad step moves each coordinate by −η·sign(g); the fluency term alone (classifier
    scale 0 on a guided row) pulls z toward μ."""

    class Const(torch.nn.Module):
        def forward(self, z, a2):
            return torch.stack([z.sum((1, 2)), -z.sum((1, 2))], dim=-1)

    z, mu = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    term = ClassifierTerm(Const(), torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))
    g = ClassifierGuidance(
        [term], torch.tensor([0.0, 0.0]), torch.tensor([1, 1]), torch.tensor([0.1, 0.1])
    )
    out = g(z, mu, 0.5, 0.3)
    assert torch.equal(out[1], z[1])  # no active term: untouched
    zz = z[:1].clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(Const()(zz, None), torch.tensor([0]))
    (grad,) = torch.autograd.grad(loss, zz)
    torch.testing.assert_close(out[:1], z[:1] - 0.1 * grad.sign())


def test_bundle_roundtrip_and_method(bundle, tmp_path):
    net, vocab, clfs, sampling = load_bundle(bundle)
    assert isinstance(vocab, Vocab) and clfs == {}
    method = DiffusionLM(net, vocab)
    assert method.name == "diffusion-lm"
    with pytest.raises(ValueError, match="DiffusionLMEngine"):
        method.condition(None)
    (tmp_path / "config.json").write_text(json.dumps({"method": "dglm"}))
    with pytest.raises(ValueError, match="not a Diffusion-LM bundle"):
        load_bundle(tmp_path)


def test_sentences_from_text_and_pairs(tmp_path):
    assert split_sentences("It rained. Then it stopped! ok") == [
        "It rained.",
        "Then it stopped! ok",
    ]
    f = tmp_path / "s.txt"
    f.write_text("\n".join(f"sentence number {i} ." for i in range(200)))
    train, held = read_sentences(f, "train"), read_sentences(f, "eval")
    assert len(train) + len(held) == 200 and held and not set(train) & set(held)
    (tmp_path / "pairs_train.jsonl").write_text(
        json.dumps({"prefix": "One thing. Another", "continuation": " thing here.", "source": "x"})
        + "\n"
    )
    assert read_sentences(tmp_path, "train") == ["One thing.", "Another thing here."]
    with pytest.raises(FileNotFoundError, match="pairs_eval"):
        read_sentences(tmp_path, "eval")
    with pytest.raises(ValueError, match="sources"):
        read_sentences("sources:no_such_source", "train")
    # several inputs joined by "+" are read in turn, each split as it would be alone
    g = tmp_path / "t.txt"
    g.write_text("\n".join(f"another line {i} ." for i in range(50)))
    for split in ("train", "eval"):
        assert read_sentences(f"{f}+{g}", split) == read_sentences(f, split) + read_sentences(
            g, split
        )


def test_cli_trains_and_adds_a_classifier(tmp_path, capsys):
    from dglm.engine.cli.main import main

    f = tmp_path / "s.txt"
    f.write_text("\n".join(SENTENCES))
    out = tmp_path / "run"
    args = [
        "train",
        "diffusion-lm",
        str(f),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--eval-every",
        "3",
        "--save-every",
        "3",
        "--warmup",
        "2",
        "--self-condition",
        "on",
        "--embedding-norm",
        "2.5",
        "--x0-head",
        "interpolate",
    ]
    assert main(args) == 0
    assert (out / "bundle" / "config.json").is_file()
    saved = json.loads((out / "bundle" / "config.json").read_text())
    net_config = saved["model"]  # the overrides reach the saved config
    assert net_config["self_condition"] is True and net_config["embedding_norm"] == 2.5
    assert net_config["x0_head"] == "interpolate"
    labelled = tmp_path / "lab.jsonl"
    labelled.write_text(
        "".join(
            json.dumps({"text": t, "label": lab}) + "\n"
            for t, lab in [(p, "pos") for p in POSITIVE * 3] + [(n, "neg") for n in NEGATIVE * 3]
        )
    )
    args = [
        "train",
        "diffusion-lm-classifier",
        str(labelled),
        "--bundle",
        str(out / "bundle"),
        "--out",
        str(tmp_path / "clf"),
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--warmup",
        "1",
        "--dim",
        "32",
        "--depth",
        "1",
    ]
    assert main(args) == 0
    eng = DiffusionLMEngine.from_pretrained(out / "bundle")
    assert eng.method.classifiers["lab"].config.labels == ("neg", "pos")
    assert main(["train", "diffusion-lm", str(f), "--out", str(out), "--preset", "nope"]) == 2
    capsys.readouterr()
    gen = ["generate", "", "the movie", "--bundle", str(out / "bundle"), "--length", "5"]
    gen += ["--infill", "___ .", "--control", "lab=pos", "--seed", "0", "--steps", "4", "--json"]
    assert main(gen) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == ["", "the movie"]
    for r in rows:
        s = r["samples"][0]
        assert len(words(r["prompt"] + s["text"])) == 5 and words(s["text"])[-1] == "."
    assert main(["generate", "x", "--length", "3"]) == 2  # not a Diffusion-LM bundle
    capsys.readouterr()
    same = [
        "generate",
        "",
        "--bundle",
        str(out / "bundle"),
        "--seed",
        "0",
        "--steps",
        "4",
        "--json",
    ]
    assert main([*same, "--control", "length=4"]) == 0
    via_control = json.loads(capsys.readouterr().out)[0]["samples"][0]
    assert main([*same, "--length", "4"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["samples"][0] == via_control
    assert len(words(via_control["text"])) == 4
    assert main([*same, "--control", "length=four"]) == 2
    assert main([*same, "--control", "length=4", "--length", "4"]) == 2
    assert "give the length once" in capsys.readouterr().err
    # --candidates / --select reach the request: MBR over 3 candidates is one of their texts
    assert main([*same, "--length", "4", "--candidates", "3", "--select", "mbr"]) == 0
    picked = json.loads(capsys.readouterr().out)[0]["samples"][0]["text"]
    api = eng.default_params(length=4, seed=0, num_inference_steps=4, candidates=3, select="mbr")
    assert picked == eng.generate([""], api)[0].samples[0].text
    assert main(["generate", "x", "--candidates", "3"]) == 2  # not a Diffusion-LM bundle
    assert "--candidates" in capsys.readouterr().err
    assert main([*same, "--length", "4", "--candidates", "0"]) == 2
    assert "candidates" in capsys.readouterr().err


def test_engine_from_pretrained_dispatches_on_the_bundle_method(bundle):
    from dglm.engine.engine import Engine

    eng = Engine.from_pretrained(bundle)
    assert isinstance(eng, DiffusionLMEngine)
    p = DiffusionLMParams(seed=2, length=4, num_inference_steps=5)
    a = eng.generate(["the"], p)[0].samples[0].token_ids
    assert (
        a == DiffusionLMEngine.from_pretrained(bundle).generate(["the"], p)[0].samples[0].token_ids
    )


def test_a_shipped_bundle_is_found_by_its_name(bundle, tmp_path, monkeypatch):
    import shutil

    from dglm.engine import bundle as shared_bundle
    from dglm.engine.engine import Engine
    from dglm.engine.methods.diffusion_lm import bundle as bundle_mod

    shipped = tmp_path / "bundles"
    shutil.copytree(bundle, shipped / "tiny-dlm")
    monkeypatch.setattr(shared_bundle, "BUNDLES_DIR", shipped)
    monkeypatch.chdir(tmp_path)  # no ./tiny-dlm here: the name resolves to the shipped copy
    assert bundle_mod.is_diffusion_lm_bundle("tiny-dlm")
    assert not bundle_mod.is_diffusion_lm_bundle("no-such-bundle")
    p = DiffusionLMParams(seed=2, length=4, num_inference_steps=5)
    by_name = Engine.from_pretrained("tiny-dlm").generate(["the"], p)[0].samples[0]
    assert by_name == DiffusionLMEngine.from_pretrained(bundle).generate(["the"], p)[0].samples[0]


def test_the_shipped_bundle_generates_controlled_text():
    from dglm.engine.engine import Engine

    eng = Engine.from_pretrained("diffusion-lm")
    assert isinstance(eng, DiffusionLMEngine) and "sentiment" in eng.method.classifiers
    p = eng.default_params(seed=0, num_inference_steps=10, infill="the tea ___ good .", length=9)
    outs = eng.generate(["", ""], [p, replace(p, infill=None, length=6)])
    infilled, sized = outs[0].samples[0].text, outs[1].samples[0].text
    assert len(words(infilled)) == 9 and words(infilled)[:2] == ["the", "tea"]
    assert words(infilled)[-2:] == ["good", "."] and len(words(sized)) == 6


def test_dglm_info_describes_a_diffusion_lm_bundle(capsys):
    """`dglm info` on a Diffusion-LM bundle (it raised AttributeError before the engine had
    `info`): the method, the denoiser's shape and size, the longest request, the classifiers."""
    from dglm.engine.cli.main import main

    for name, most in (("diffusion-lm", 14), ("diffusion-lm-long", 30)):
        assert main(["info", "--bundle", name]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["method"] == "diffusion-lm" and info["max_words"] == most
        assert info["model"]["seq_len"] == most + 2 and info["model"]["parameters"] > 1e6
        assert info["classifiers"]["sentiment"]["labels"] == ["negative", "positive"]
        assert info["sampling"]["sampler"] == "ddim" and info["model"]["vocab_size"] == 2000


def test_the_long_shipped_bundle_writes_up_to_30_words():
    """`--bundle diffusion-lm-long`: 32 positions ("cpu-long-ce"), a sentiment classifier, and a
    30-word request (the full length) and a guided infill honoured exactly."""
    from dglm.engine.engine import Engine

    eng = Engine.from_pretrained("diffusion-lm-long")
    assert eng.method.net.config == DIFFUSION_LM_PRESETS["cpu-long-ce"]
    assert "sentiment" in eng.method.classifiers
    p = eng.default_params(seed=0, num_inference_steps=10, length=30)
    q = replace(
        p, length=20, infill="the tea ___ good .", controls=(Control("sentiment", "positive"),)
    )
    full, filled = (o.samples[0].text for o in eng.generate(["", ""], [p, q]))
    assert len(words(full)) == 30
    assert len(words(filled)) == 20 and words(filled)[:2] == ["the", "tea"]
    assert words(filled)[-2:] == ["good", "."]


def test_self_conditioning_and_embedding_norm_train_and_sample(tmp_path):
    """A self-conditioned denoiser with fixed-norm word embeddings (config.self_condition,
    config.embedding_norm): its estimate input starts at zero (the plain denoiser), training (half
    the rows fed a first, no-grad estimate) lowers the loss and makes the network read the
    estimate, every embedding the diffusion sees keeps the set norm and stays decodable; the
    saved bundle keeps both settings and samples with the previous step's estimate fed back,
    same seed → same text."""
    torch.manual_seed(0)
    vocab = build_vocab(SENTENCES, 64, 12)
    config = replace(DIFFUSION_LM_PRESETS["tiny"], vocab_size=len(vocab), self_condition=True,
                     embedding_norm=8**0.5)  # fmt: skip
    net = DiffusionLMNetwork(config)
    z, a2 = torch.randn(2, 12, config.emb_dim), torch.tensor([0.3, 0.8])
    est = torch.randn(2, 12, config.emb_dim)
    assert torch.equal(net(z, a2, est), net(z, a2))  # zero-initialised: no effect yet
    ids, _ = encode_sentences(SENTENCES, vocab, config.seq_len)
    cfg = TrainConfig(
        steps=200, batch_size=32, lr=3e-3, warmup=10, eval_every=50, save_every=50, ema_decay=0.9
    )
    path = train_diffusion_lm(net, vocab, ids, ids[:16], tmp_path, cfg)
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_loss"] < 0.7 * rows[0]["eval_loss"]
    assert rows[-1]["eval_round_err"] == 0.0
    engine = DiffusionLMEngine.from_pretrained(path)
    trained = engine.method.net
    assert trained.config.self_condition and trained.proj_self.weight.abs().sum() > 0
    norms = trained.table().norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, 8**0.5))
    assert trained.embed.weight.norm(dim=-1).std() > 1e-3  # the raw table is free; its use is not
    with pytest.raises(ValueError, match="embedding_norm"):
        replace(config, embedding_norm=-1.0)
    assert not torch.allclose(trained(z, a2, est), trained(z, a2))
    p = DiffusionLMParams(seed=3, num_inference_steps=12)
    first = engine.generate([""], p)[0].samples[0]
    assert first.token_ids == engine.generate([""], p)[0].samples[0].token_ids
    assert first.text.strip()


def test_cpu_wide_sc_preset_has_both_settings():
    """The "cpu-wide-sc" preset is "cpu-wide" with both settings on (it once shipped without the
    fixed norm, so runs trained on it still had the free table its name promised to fix)."""
    base, sc = DIFFUSION_LM_PRESETS["cpu-wide"], DIFFUSION_LM_PRESETS["cpu-wide-sc"]
    assert sc.self_condition and sc.embedding_norm == pytest.approx(sc.emb_dim**0.5)
    assert replace(sc, self_condition=False, embedding_norm=0.0) == base


def test_ce_presets_are_the_sc_preset_with_the_interpolate_head():
    """ "cpu-wide-ce" is "cpu-wide-sc" with the score-interpolation head; "cpu-short-ce" the same
    for ≤ 14 words over 2,000 words, "cpu-long-ce" for ≤ 30 (32 positions)."""
    sc = DIFFUSION_LM_PRESETS["cpu-wide-sc"]
    ce, short = DIFFUSION_LM_PRESETS["cpu-wide-ce"], DIFFUSION_LM_PRESETS["cpu-short-ce"]
    assert sc.x0_head == "regress"
    assert ce == replace(sc, x0_head="interpolate")
    assert short == replace(ce, vocab_size=2000, seq_len=16)
    assert DIFFUSION_LM_PRESETS["cpu-long-ce"] == replace(short, seq_len=32)


def test_eval_word_error_counts_the_words_only():
    """The held-out token error over every position and over the words alone: a prediction that
    gets every PAD/BOS/EOS right and every word wrong is 100% wrong on words and only the words'
    share wrong overall."""
    from dglm.engine.methods.diffusion_lm.model import DIFFUSION_LM_PRESETS, DiffusionLMNetwork
    from dglm.engine.methods.diffusion_lm.vocab import BOS, EOS, PAD
    from dglm.engine.training.diffusion_lm import evaluate_diffusion_lm

    torch.manual_seed(0)
    net = DiffusionLMNetwork(DIFFUSION_LM_PRESETS["tiny"])
    L = net.config.seq_len
    ids = torch.tensor([[BOS, 5, 6, 7, EOS] + [PAD] * (L - 5), [BOS, 9, EOS] + [PAD] * (L - 3)])

    class Fake:
        T = 100

        def __call__(self, net, ids, gen, t_idx=None):
            table = net.table().detach()
            wrong = torch.where(ids >= 4, torch.full_like(ids, PAD), ids)  # every word → PAD
            z = torch.zeros(())
            return {"loss": z, "mse": z, "nll": z, "prior": z, "x0": table[ids],
                    "pred": table[wrong]}  # fmt: skip

    logs = evaluate_diffusion_lm(net, Fake(), ids)
    assert logs["eval_round_err"] == 0.0
    assert logs["eval_x0_word_err_t0.5"] == 1.0
    assert logs["eval_x0_err_t0.5"] == pytest.approx(4 / (2 * L))


def test_rounding_never_picks_unk_at_a_free_position():
    """UNK (every out-of-vocabulary word) is never a free position's output, even where x sits on
    UNK's own embedding; a fixed UNK (context with an unknown word) is kept; the rest is nearest."""
    from dglm.engine.methods.diffusion_lm.sampling import Layout, Rounder
    from dglm.engine.methods.diffusion_lm.vocab import UNK

    torch.manual_seed(0)
    table = torch.randn(12, 4)
    r = Rounder(table)
    x = table[[UNK, 7, UNK]][None].clone()  # (1, 3, d): on UNK, on word 7, on UNK
    free = Layout(torch.zeros(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.long),
                  torch.zeros(1, 3, dtype=torch.bool))  # fmt: skip
    ids, snapped = r(x, free)
    dist = torch.cdist(table[UNK][None], table)[0]
    dist[UNK] = float("inf")
    assert ids[0, 0] == ids[0, 2] == int(dist.argmin()) != UNK
    assert ids[0, 1] == 7 and torch.equal(snapped[0, 1], table[7])
    fixed = Layout(torch.tensor([[True, False, False]]), torch.tensor([[UNK, 0, 0]]),
                   torch.zeros(1, 3, dtype=torch.bool))  # fmt: skip
    ids, snapped = r(x, fixed)
    assert ids[0, 0] == UNK and torch.equal(snapped[0, 0], table[UNK]) and ids[0, 2] != UNK


def test_interpolate_head_is_the_mean_embedding_of_its_word_scores(tmp_path):
    """The "interpolate" x̂0 head: word scores by the rounding rule of the last layer's output,
    uniform at initialisation (cross-entropy log V), x̂0 the softmax-weighted mean of the table;
    trained by cross-entropy, its held-out loss falls, the tiny corpus's words are recovered at low
    noise, and the bundle keeps the head and samples with it."""
    from dglm.engine.methods.diffusion_lm.model import X0_HEADS
    from dglm.engine.training.diffusion_lm import DiffusionLMLoss

    torch.manual_seed(0)
    vocab = build_vocab(SENTENCES, 64, 12)
    config = replace(DIFFUSION_LM_PRESETS["tiny"], vocab_size=len(vocab), self_condition=True,
                     embedding_norm=8**0.5, x0_head="interpolate")  # fmt: skip
    net = DiffusionLMNetwork(config)
    z, a2 = torch.randn(2, 12, config.emb_dim), torch.tensor([0.3, 0.8])
    x0, scores = net.denoise(z, a2)
    assert scores.shape == (2, 12, len(vocab)) and scores.dtype == torch.float32
    table = net.table().float()
    torch.testing.assert_close(x0, table.mean(0).expand_as(x0))  # uniform at init
    with torch.no_grad():  # any output: x̂0 = softmax(2q·E − ‖E‖²) @ E
        net.proj_out.bias.normal_()
        net.proj_out.weight.normal_(std=0.1)
        x0, scores = net.denoise(z, a2)
        q = net.proj_out(net.transformer(net.proj_in(z) + net.time(a2)[:, None], net.time(a2)))
        ref = (2 * q @ table.T - table.pow(2).sum(-1)).softmax(-1) @ table
    torch.testing.assert_close(x0, ref)
    torch.testing.assert_close(net(z, a2), x0)
    ids, _ = encode_sentences(SENTENCES, vocab, config.seq_len)
    out = DiffusionLMLoss(net)(net, ids[:8], torch.Generator().manual_seed(0))
    assert "ce" in out and torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="x0_head"):
        replace(config, x0_head="logits")
    assert X0_HEADS == ("regress", "interpolate")

    net = DiffusionLMNetwork(config)
    cfg = TrainConfig(
        steps=200, batch_size=32, lr=3e-3, warmup=10, eval_every=50, save_every=50, ema_decay=0.9
    )
    path = train_diffusion_lm(net, vocab, ids, ids[:16], tmp_path, cfg)
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows[0]["eval_ce"] > 0 and rows[-1]["eval_ce"] < 0.5 * rows[0]["eval_ce"]
    assert rows[-1]["eval_x0_word_err_t0.25"] < 0.5
    engine = DiffusionLMEngine.from_pretrained(path)
    assert engine.method.net.config.x0_head == "interpolate"
    p = DiffusionLMParams(seed=3, num_inference_steps=12, length=4)
    first = engine.generate([""], p)[0].samples[0]
    assert len(first.token_ids) == 4
    assert first.token_ids == engine.generate([""], p)[0].samples[0].token_ids


def test_bundles_without_x0_head_load_as_regress(bundle, tmp_path):
    """Bundles written before the head was configurable (no "x0_head" in config.json) load as
    the paper's regression head."""
    cfg_path = bundle / "config.json"
    raw = json.loads(cfg_path.read_text())
    assert raw["model"]["x0_head"] == "regress"
    import shutil

    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    del raw["model"]["x0_head"]
    (old / "config.json").write_text(json.dumps(raw))
    net, _, _, _ = load_bundle(old)
    assert net.config.x0_head == "regress"
