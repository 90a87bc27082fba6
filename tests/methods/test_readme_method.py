"""The README's new-method example (a logit-bias toy), run as written on the tiny bundle: a method
added without touching the engine."""

from __future__ import annotations

import re
from pathlib import Path

from dglm.engine import GenerationParams

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example(name: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)\n```", text, re.S)
    assert m is not None, f"README has no example {name!r}"
    return m.group(1)


def test_readme_logit_bias_method(tiny_bundle):
    code = readme_example("logit-bias")
    assert len(code.splitlines()) <= 30
    load = 'Engine.from_pretrained("default")'
    assert load in code
    ns: dict = {}
    exec(code.replace(load, f"Engine.from_pretrained({str(tiny_bundle)!r})"), ns)  # noqa: S102
    engine, banned = ns["engine"], ns["banned"]
    tokens = [t for o in ns["outs"] for s in o.samples for t in s.token_ids]
    assert tokens and not set(tokens) & set(banned)
    # the method acts: a large positive bias makes its token every token, by name and as an object
    forced = ns["BiasedDecoding"]({7: 100.0})
    p = GenerationParams(seed=0, max_new_tokens=5, ignore_eos=True)
    assert engine.generate(["The food"], p, method=forced)[0].samples[0].token_ids == [7] * 5
    engine.register(forced)
    assert engine.generate(["The food"], p, method="logit-bias")[0].samples[0].token_ids == [7] * 5
    plain = engine.generate(["The food"], p, method="plain")[0].samples[0].token_ids
    assert plain != [7] * 5
