"""What the command modules share: the usage exit code, progress bars and argument types."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

EXIT_USAGE = 2  # a ValueError (bad user input) ends the command with this code


def progress_bar(total: int | None, desc: str, **kwargs):
    """A tqdm bar on stderr, hidden when stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, disable=None, **kwargs)


def comma_separated(convert: Callable[[str], object], what: str) -> Callable[[str], tuple]:
    """An argparse type for "1,2,3": a tuple of convert(item), or a usage error naming `what`."""

    def parse(text: str) -> tuple:
        try:
            return tuple(convert(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from None

    return parse


def flags(args: argparse.Namespace, *names: str) -> dict:
    """{name: args.name}: the flags a command passes on under their own names."""
    return {name: getattr(args, name) for name in names}


def command_group(sub, name: str, help: str):
    """`dglm <name> <command>`: a group's parser on the top-level subparsers → its subparsers."""
    group = sub.add_parser(name, help=help)
    return group.add_subparsers(dest=f"{name}_command", required=True)


def device(text: str) -> str:
    """An argparse type for --device: a usage error naming the flag for a device torch cannot
    parse or this machine lacks (e.g. cuda without a GPU)."""
    from dglm.engine.engine import resolve_device  # heavy (torch): only when the flag is parsed

    try:
        resolve_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def float_pair(text: str) -> tuple[float, float]:
    """An argparse type for "LO,HI" (one number: LO = HI)."""
    parts = text.split(",")
    try:
        values = [float(x) for x in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected LO,HI (or one number), got {text!r}")
    return values[0], values[1]


def configure_logging(verbose: bool) -> None:
    """Log INFO to stderr with -v, else warnings only (spawned training processes call it too)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
