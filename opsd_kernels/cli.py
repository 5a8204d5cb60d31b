"""The `opsd` command line.

    opsd train --config cfg.yaml [--key value ...]   train (OPSD, or --method sft)
    opsd eval  --config cfg.yaml [--checkpoint DIR]  greedy accuracy on eval_data
    opsd demo  [--device cuda] [--key value ...]     OPSD end to end on the embedded tiny model
    opsd bench [--tokens N --hidden H --vocab V]     the fused loss beside the naive form
    opsd env                                         which backends are usable here, and why

Every config field can be given as ``--key value`` (YAML syntax: 3, 1e-5, true, null, [a, b]);
it overrides the config file.
"""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opsd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train with a YAML config (+ --key value)")
    train.add_argument("--config", default=None, help="YAML file of OPSDConfig fields")
    evaluate = commands.add_parser("eval", help="greedy accuracy on the config's eval_data")
    evaluate.add_argument("--config", default=None)
    evaluate.add_argument("--checkpoint", default=None,
                          help="a checkpoint-N or final directory of a run (default: the "
                               "config's model as it is)")
    demo = commands.add_parser("demo", help="OPSD end to end on the embedded tiny model")
    demo.add_argument("--device", default="auto")
    bench = commands.add_parser("bench", help="the fused loss beside the naive form")
    bench.add_argument("--tokens", type=int, default=None)
    bench.add_argument("--hidden", type=int, default=None)
    bench.add_argument("--vocab", type=int, default=None)
    commands.add_parser("env", help="which backends are usable here, and why not")
    return parser


def _config(path: str | None, overrides: dict):
    from opsd_kernels.trainer.config import OPSDConfig

    if path is None:
        return OPSDConfig.from_dict(overrides, source="command line")
    return OPSDConfig.from_yaml(path, overrides)


def main(argv: list[str] | None = None) -> None:
    args, rest = _parser().parse_known_args(argv)
    if rest and args.command not in ("train", "eval", "demo"):
        _parser().error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        _run(args, rest)
    except ValueError as e:  # bad config or data: the message says what to fix
        print(f"opsd {args.command}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args: argparse.Namespace, rest: list[str]) -> None:
    from opsd_kernels.trainer.config import parse_overrides

    if args.command == "train":
        from opsd_kernels.trainer.models import load_model_and_tokenizer
        from opsd_kernels.trainer.trainer import OPSDTrainer

        config = _config(args.config, parse_overrides(rest))
        if config.train_data is None:
            raise ValueError("config.train_data: required for opsd train")
        model, tokenizer = load_model_and_tokenizer(config)
        OPSDTrainer(model, tokenizer, config.train_data, config,
                    eval_dataset=config.eval_data).train()
    elif args.command == "eval":
        from opsd_kernels.trainer.evaluate import evaluate_checkpoint

        config = _config(args.config, parse_overrides(rest))
        print(json.dumps(evaluate_checkpoint(config, args.checkpoint)))
    elif args.command == "demo":
        from opsd_kernels.trainer.demo import run_demo

        run_demo(parse_overrides(rest), device=args.device)
    elif args.command == "bench":
        from opsd_kernels.compare import run_comparison

        run_comparison(args.tokens, args.hidden, args.vocab)
    elif args.command == "env":
        from opsd_kernels import env_report

        for name, status in env_report().items():
            print(f"{name:8} {status}")


if __name__ == "__main__":
    main()
