"""`dglm`: the top-level parser and dispatch. Each command group registers its own sub-parser."""

from __future__ import annotations

import argparse
import sys

from dglm.engine.cli import bundle, data, export, generate, probe, serve, train
from dglm.engine.cli import eval as eval_
from dglm.engine.cli.common import EXIT_USAGE, configure_logging

# in `dglm --help` order; `generate` registers `generate` and `info`
COMMAND_GROUPS = (generate, data, train, bundle, export, probe, eval_, serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dglm", description="Diffusion-guided controllable generation")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is fastest on a busy machine)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch  # here, not at the top: `dglm --help` stays fast

        torch.set_num_threads(args.threads)
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: a value, a path
        print(f"dglm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        print(f"dglm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
