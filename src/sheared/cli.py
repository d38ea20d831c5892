"""The `sheared` command line: argparse subcommands mapped to plain functions; nothing else.

User mistakes (`UserError`) print one line `sheared: error: ...` and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from sheared.errors import UserError

INFO_FIELDS = (
    "family",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)


def source_info(spec: str) -> dict:
    """Shape and parameter counts of a source, read from its config only (no weights loaded)."""
    from sheared.model import parameter_counts, read_source_config

    args, _, path = read_source_config(spec)
    info = {name: getattr(args, name) for name in INFO_FIELDS}
    info.update(parameter_counts(args))
    info["source"] = str(path)
    return info


def cmd_info(ns: argparse.Namespace) -> int:
    info = source_info(ns.source)
    if ns.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"{key:<{width}}  {shown}")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from sheared.config import load_config
    from sheared.demo import DemoConfig, run_demo

    run_demo(load_config(DemoConfig, ns.config, ns.overrides), ns.run_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sheared",
        description="Prune a pretrained LLaMA-family model to an exact smaller shape, then continue "
        "pretraining it (Sheared LLaMA).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="shape and parameter counts of a source model")
    p.add_argument("source", help="a Hugging Face model directory, a .gguf file, or smollm2-135m")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="run the demo pipeline on the embedded default source")
    p.add_argument("--config", default=None, help="YAML file of DemoConfig values (optional)")
    p.add_argument("--run-dir", default="runs/demo", help="where results and the resolved config go")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. max_new_tokens=20")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except UserError as e:
        print(f"sheared: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
