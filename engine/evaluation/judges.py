"""Independent judges of generated text: sentiment (VADER, TextBlob), toxicity (alt-profanity-check,
HateSonar), and the probes' own view and proposal fidelity for comparison.

- sentiment: VADER compound > 0.05 positive, < −0.05 negative, and TextBlob's (pattern lexicon)
  polarity > 0.1 positive, < −0.1 negative; neither shares anything with MiniLM or the probes;
- toxicity: alt-profanity-check probability (the toxicity probe's weak labels come from it, so it is
  not independent of that probe) and HateSonar's p(hate speech or offensive language), each as a
  mean and the share above 0.5;
- proposal fidelity: cos(encoder(generated continuation), sampled latent).

Every judge package is an optional dependency (the `eval` extra), imported on first use.
"""

from __future__ import annotations

import functools
import importlib
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from dglm.engine.evaluation.metrics import put_mean, put_rate
from dglm.engine.methods.fudge import target_logprob
from dglm.engine.probes import Probe

VADER_THRESHOLD = 0.05  # |compound| above this is polar (Hutto & Gilbert, 2014)
# |polarity| above this is polar: TextBlob's pattern lexicon gives mild scores to many everyday
# adjectives ("long" −0.05, "old" 0.1, "new" 0.14), so a bare sign would count those
TEXTBLOB_THRESHOLD = 0.1
TOXIC_THRESHOLD = 0.5
NEURAL_THRESHOLD = 0.5  # a neural judge's p(positive) above this is positive, below 1 − it negative
PROFANITY_NOTE = "the toxicity probe's weak labels come from alt-profanity-check"
EVAL_INSTALL = "pip install 'dglm-engine[eval]'"


class SentimentJudge(Protocol):
    """A neural sentiment judge independent of the bundle's models (see neural_judge)."""

    name: str

    def p_positive(self, texts: list[str]) -> list[float]:
        """p(positive) in [0, 1] per text."""
        ...


def optional_import(module: str, what: str, package: str | None = None):
    """Import the module of an optional judge (`package`, default the module's top name) on first
    use, or raise naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"{what} needs {package or module.split('.')[0]}: {EVAL_INSTALL}") from e


_VADER = None


def vader_compound(texts: list[str]) -> list[float]:
    """VADER compound polarity in [−1, 1] per text. Scores are memoised per text (VADER is a pure
    function of it): an eval scores each setting's texts for its rates and again for the paired
    test, and the second pass is a lookup."""
    global _VADER
    if _VADER is None:
        vader = optional_import("vaderSentiment.vaderSentiment", "the sentiment metric")
        _VADER = vader.SentimentIntensityAnalyzer()
    return [_vader_one(t) for t in texts]


@functools.lru_cache(maxsize=1 << 16)
def _vader_one(text: str) -> float:
    return _VADER.polarity_scores(text)["compound"]


def textblob_polarity(texts: list[str]) -> list[float]:
    """TextBlob polarity in [−1, 1] per text (the pattern lexicon shipped in the package)."""
    textblob = optional_import("textblob", "the second sentiment judge")
    return [float(textblob.TextBlob(t).sentiment.polarity) for t in texts]


def _polar_rates(scores: list[float], threshold: float, mean_key: str) -> dict[str, float]:
    if not scores:
        return {"positive": float("nan"), "negative": float("nan"), mean_key: float("nan")}
    n = len(scores)
    return {
        "positive": sum(x > threshold for x in scores) / n,
        "negative": sum(x < -threshold for x in scores) / n,
        mean_key: sum(scores) / n,
    }


def sentiment_rates(texts: list[str], threshold: float = VADER_THRESHOLD) -> dict[str, float]:
    """{"positive": share with VADER compound > threshold, "negative": share < −threshold,
    "compound": mean compound}."""
    return _polar_rates(vader_compound(texts) if texts else [], threshold, "compound")


def textblob_rates(texts: list[str], threshold: float = TEXTBLOB_THRESHOLD) -> dict[str, float]:
    """{"positive": share with TextBlob polarity > threshold, "negative": share < −threshold,
    "polarity": mean polarity}."""
    return _polar_rates(textblob_polarity(texts) if texts else [], threshold, "polarity")


def profanity_probability(texts: list[str]) -> list[float]:
    """alt-profanity-check's probability that each text is offensive."""
    check = optional_import("profanity_check", "the toxicity metric", "alt-profanity-check")
    return [float(x) for x in check.predict_prob(list(texts))] if texts else []


def _mean_and_share(p: list[float], threshold: float) -> dict[str, float]:
    if not p:
        return {"mean": float("nan"), "frac": float("nan")}
    return {"mean": sum(p) / len(p), "frac": sum(x > threshold for x in p) / len(p)}


def toxicity(texts: list[str], threshold: float = TOXIC_THRESHOLD) -> dict[str, float]:
    """alt-profanity-check probabilities: {"mean": mean probability, "frac": share > threshold}."""
    return _mean_and_share(profanity_probability(texts) if texts else [], threshold)


_HATESONAR = None
_HATESONAR_LOCALES = ("C.UTF-8", "en_US.UTF-8")


def hatesonar_model():
    """HateSonar's ONNX model (proto) with every StringNormalizer's locale set to C.UTF-8.

    The shipped model leaves the locale at ONNX Runtime's default, en_US.UTF-8, which many machines
    lack (session creation then fails). Its tokenizer keeps only [a-zA-Z0-9_] runs, so lower-casing
    under C.UTF-8 gives the same features. The package's files are not modified.
    """
    what = "the second toxicity judge"
    onnx = optional_import("onnx", what, "hatesonar")
    model = onnx.load(str(optional_import("hatesonar.api", what).DEFAULT_MODEL_FILE))
    set_string_normalizer_locale(model, _HATESONAR_LOCALES[0])
    return model


def set_string_normalizer_locale(model, locale: str) -> int:
    """Set the `locale` attribute of every StringNormalizer node of an ONNX model in place;
    returns how many nodes were changed."""
    import onnx  # optional (the `eval` extra); a model proto is at hand only when it is installed

    changed = 0
    for node in model.graph.node:
        if node.op_type != "StringNormalizer":
            continue
        kept = [a for a in node.attribute if a.name != "locale"]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("locale", locale)])
        changed += 1
    return changed


def hatesonar_session():
    """HateSonar's ONNX Runtime session, made on first use (with the first locale that loads)."""
    global _HATESONAR
    if _HATESONAR is None:
        ort = optional_import("onnxruntime", "the second toxicity judge")

        model = hatesonar_model()
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        errors = []
        for locale in _HATESONAR_LOCALES:
            set_string_normalizer_locale(model, locale)
            try:
                _HATESONAR = ort.InferenceSession(
                    model.SerializeToString(), options, providers=["CPUExecutionProvider"]
                )
                break
            except Exception as e:  # noqa: BLE001 - an unusable locale: try the next one
                errors.append(f"{locale}: {e}")
        else:
            raise RuntimeError("HateSonar's model could not be loaded: " + "; ".join(errors))
    return _HATESONAR


def hatesonar_probability(texts: list[str]) -> list[float]:
    """HateSonar's p(hate speech) + p(offensive language) per text (classes 0, 1; 2 = neither)."""
    if not texts:
        return []
    _, probs = hatesonar_session().run(None, {"text": np.array(list(texts), dtype=object)})
    return [float(row[0] + row[1]) for row in probs]


def hate_speech(texts: list[str], threshold: float = TOXIC_THRESHOLD) -> dict[str, float]:
    """HateSonar: {"mean": mean p(hate or offensive), "frac": share > threshold}."""
    return _mean_and_share(hatesonar_probability(texts), threshold)


def fidelity(encoder, texts: list[str], latents: torch.Tensor) -> torch.Tensor:
    """(N,) cos(encoder(text_i), latent_i): how closely a continuation follows its proposal."""
    if latents.shape[0] != len(texts):
        raise ValueError(f"{len(texts)} texts but {latents.shape[0]} latents")
    emb = encoder.embed(list(texts)).float().cpu()  # (N, d) unit norm
    return F.cosine_similarity(emb, latents.float().cpu(), dim=-1)


def probe_probability(probe: Probe, target: str | int, emb: torch.Tensor) -> torch.Tensor:
    """(N,) p(target | text) under a probe, from embeddings (N, d)."""
    return target_logprob(probe, target, emb).exp()


def judge_texts(texts: list[str]) -> dict:
    """Sentiment and toxicity by the independent judges, with 95% intervals (see the module doc)."""
    m: dict = {}
    vader, blob = vader_compound(texts), textblob_polarity(texts)
    put_rate(m, "vader_positive", [x > VADER_THRESHOLD for x in vader])
    put_rate(m, "vader_negative", [x < -VADER_THRESHOLD for x in vader])
    put_mean(m, "vader_compound", vader)
    put_rate(m, "textblob_positive", [x > TEXTBLOB_THRESHOLD for x in blob])
    put_rate(m, "textblob_negative", [x < -TEXTBLOB_THRESHOLD for x in blob])
    put_mean(m, "textblob_polarity", blob)
    profanity, sonar = profanity_probability(texts), hatesonar_probability(texts)
    put_mean(m, "toxicity_mean", profanity)
    put_rate(m, "toxicity_frac", [x > TOXIC_THRESHOLD for x in profanity])
    put_mean(m, "hatesonar_mean", sonar)
    put_rate(m, "hatesonar_frac", [x > TOXIC_THRESHOLD for x in sonar])
    return m
