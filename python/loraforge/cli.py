"""The `loraforge` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from loraforge import demo

    result = demo.run(steps=args.steps, seed=args.seed)
    return 0 if result["bit_exact"] and result["losses"][-1] < result["losses"][0] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraforge", description="Fast, exact LoRA / QLoRA fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="offline tiny-model demo on CPU: NF4 quantization checked against bitsandbytes, then training",
        description="Builds a tiny Llama offline, quantizes its linear weights to NF4 with loraforge's kernels "
        "(checked byte for byte against bitsandbytes) and trains it for a few steps, showing the loss fall.",
    )
    demo.add_argument("--steps", type=int, default=40, help="training steps (default: 40)")
    demo.add_argument("--seed", type=int, default=0, help="random seed for the model (default: 0)")
    demo.set_defaults(handler=_demo)
    args = parser.parse_args(argv)
    if args.command == "demo" and args.steps < 1:
        parser.error("--steps must be at least 1")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
