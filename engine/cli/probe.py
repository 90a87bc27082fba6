"""`dglm probe train`: a logistic probe from labelled JSONL, added to a bundle."""

from __future__ import annotations

import argparse
import json

from dglm.engine.cli.common import command_group


def add_parser(sub) -> None:
    psub = command_group(sub, "probe", "probes")
    pt = psub.add_parser(
        "train", help="train a logistic probe from JSONL {text, label} and add it to a bundle"
    )
    pt.add_argument("name")
    pt.add_argument("data")
    pt.add_argument("--bundle", required=True)
    pt.add_argument(
        "--labels", default=None, help="label order, e.g. negative,positive (y=1 is last)"
    )
    pt.set_defaults(func=cmd_probe_train)


def cmd_probe_train(args: argparse.Namespace) -> int:
    from dglm.engine import bundle as bundle_io
    from dglm.engine.encode.encoder import SentenceEncoder
    from dglm.engine.training.builder import (
        add_probe_to_bundle,
        probe_from_texts,
        read_labelled_jsonl,
    )

    bundle_dir = bundle_io.resolve_bundle_dir(args.bundle)
    config = bundle_io.read_config(bundle_dir)
    texts, labels = read_labelled_jsonl(args.data)
    order = tuple(args.labels.split(",")) if args.labels else None
    enc = SentenceEncoder(bundle_io.resolve_reference(config.encoder, bundle_dir))
    probe = probe_from_texts(args.name, enc, texts, labels, order)
    add_probe_to_bundle(bundle_dir, probe)
    print(json.dumps({"probe": probe.name, "labels": list(probe.labels), **probe.metrics}))
    return 0
