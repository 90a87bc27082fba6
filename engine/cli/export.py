"""`dglm export onnx`: ONNX graphs of a bundle with a manifest, validated against PyTorch."""

from __future__ import annotations

import argparse

from dglm.engine.cli.common import command_group


def add_parser(sub) -> None:
    exsub = command_group(sub, "export", "export a bundle for other runtimes")
    eo = exsub.add_parser(
        "onnx", help="ONNX graphs + manifest, validated against PyTorch (fails on mismatch)"
    )
    eo.add_argument("bundle", help="bundle directory or shipped name")
    eo.add_argument("outdir")
    eo.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"))
    eo.add_argument("--batch-buckets", default="1,2,4,8", help="comma-separated batch sizes")
    eo.add_argument("--max-len", type=int, default=256, help="KV slots: prefix + soft prompt + new")
    eo.add_argument("--no-validate", action="store_true", help="skip the PyTorch comparison")
    eo.add_argument(
        "--re-control-max-steps", type=int, default=64,
        help="steps the value networks' edit graphs unroll (value_<probe>.onnx; a request's n ≤ it)",
    )  # fmt: skip
    eo.set_defaults(func=cmd_export_onnx)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from dglm.export.onnx import ExportConfig, export_onnx

    try:
        buckets = tuple(int(b) for b in args.batch_buckets.split(","))
    except ValueError:
        raise ValueError(
            f"--batch-buckets must be comma-separated integers, got {args.batch_buckets!r}"
        ) from None
    config = ExportConfig(
        dtype=args.dtype, batch_buckets=buckets, max_len=args.max_len,
        validate=not args.no_validate, re_control_max_steps=args.re_control_max_steps,
    )  # fmt: skip
    manifest = export_onnx(args.bundle, args.outdir, config)
    print(f"wrote {args.outdir} ({config.dtype}, opset {manifest['opset']}, buckets {buckets})")
    for name, g in manifest["graphs"].items():
        print(f"  {name}: {g['file']} ({g['nodes']} nodes)")
    v = manifest["validation"]
    if v:
        worst = max(o["rel"] for g in v["graphs"].values() for o in g.values())
        print(
            f"validated: max relative diff {worst:.2e} (rtol {v['rtol']:g}), greedy tokens "
            f"{'identical' if v['greedy']['identical'] else 'differ at near-ties'}"
        )
    return 0
