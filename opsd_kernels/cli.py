"""The `opsd` command line.

    opsd train --config cfg.yaml [--field value ...]   train (OPSD, or --method sft)
    opsd eval  --config cfg.yaml [--checkpoint DIR]    greedy accuracy on eval_data
    opsd demo  [--model tiny] [--field value ...]      OPSD end to end on SmolLM2 (or the toy)
    opsd compare --config cfg.yaml [--methods opsd,sft,grpo --seeds 0,1,2 --out DIR]
                                                       the methods side by side, several seeds
    opsd bench [--tokens N --hidden H --vocab V]       the fused loss beside the naive form
    opsd env                                           which backends are usable here, and why

Every config field is also a flag (`opsd train --help` lists them with their defaults); a flag
overrides the config file. Arguments are parsed before torch or transformers are imported, and
every error is one line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from typing import Any, NoReturn

from opsd_kernels.trainer.nonfinite import TrainingStopped  # plain Python: no torch

# Subcommands that take config fields as flags: their parsing is left to the config parser
# (built from OPSDConfig, so --help cannot drift from the fields).
_CONFIG_COMMANDS = {
    "train": "train with a YAML config and/or flags (every config field is a flag)",
    "eval": "greedy accuracy on the config's eval_data, of a checkpoint or the model as it is",
    "demo": "OPSD end to end on SmolLM2-135M-Instruct, or with --model tiny on a small toy "
            "(flags override the demo's settings)",
    "compare": "OPSD, SFT and GRPO from the same start on the same problems over several seeds: "
               "held-out accuracy against steps, generated tokens and time (JSON, md, PNG)",
}


class CommandLineError(Exception):
    """A bad command line: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CommandLineError(f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="opsd", description=__doc__, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, summary in _CONFIG_COMMANDS.items():
        # add_help=False: --help reaches the config parser, which lists every field.
        commands.add_parser(name, help=summary, add_help=False)
    bench = commands.add_parser(
        "bench", help="the fused loss beside the naive form (values, time, memory)",
        description="Time and peak memory of one forward + backward of the fused loss and of "
        "the naive form (full [N, V] logits), on random inputs, for four loss variants.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    bench.add_argument("--tokens", type=_positive_int, default=None,
                       help="rows N (tokens); default 4096 on a GPU, 1024 on a CPU")
    bench.add_argument("--hidden", type=_positive_int, default=None,
                       help="hidden size H; default 4096 on a GPU, 256 on a CPU")
    bench.add_argument("--vocab", type=_positive_int, default=None,
                       help="vocabulary size V; default 128256 on a GPU, 32768 on a CPU")
    commands.add_parser("env", help="which backends are usable here, and why not",
                        allow_abbrev=False)
    return parser


def _config_parser(command: str) -> Any:
    """transformers' HfArgumentParser over OPSDConfig, plus the command's own flags."""
    import dataclasses
    import typing

    from transformers import HfArgumentParser

    from opsd_kernels.trainer.config import OPSDConfig

    class ConfigParser(HfArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise CommandLineError(f"{message} (see {self.prog} --help)")

    description = _CONFIG_COMMANDS[command] + ". Values as in YAML: 3, 1e-5, true, null; " \
        "lists as --lora_target_modules q_proj v_proj."
    parser = ConfigParser(OPSDConfig, prog=f"opsd {command}", description=description,
                          allow_abbrev=False)
    if command in ("train", "eval", "compare"):
        parser.add_argument("--config", default=None,
                            help="YAML file of config fields; flags override it")
    if command == "compare":
        parser.add_argument("--methods", type=_names, default=["opsd", "sft", "grpo"],
                            help="comma-separated methods (default: opsd,sft,grpo)")
        parser.add_argument("--seeds", type=_integers, default=[0, 1, 2],
                            help="comma-separated seeds (default: 0,1,2)")
        parser.add_argument("--eval_every", type=_positive_int, default=10,
                            help="evaluate (greedy) every N optimizer steps (default: 10)")
        parser.add_argument("--eval_samples", type=_positive_int, default=2,
                            help="samples per problem of the sampled evaluation (default: 2)")
        parser.add_argument("--out", default="bench/results",
                            help="directory of the json / md / png (default: bench/results)")
        parser.add_argument("--tag", default=None,
                            help="added to the file names (<model>-<date>-<tag>-comparison.*), "
                                 "e.g. for an ablation beside the main comparison")
    if command == "eval":
        parser.add_argument("--checkpoint", default=None,
                            help="a run's checkpoints/checkpoint_N or final directory "
                                 "(default: the config's model as it is)")
    # `null` on the command line unsets an optional field, as in YAML.
    hints = typing.get_type_hints(OPSDConfig)
    optional = {f.name for f in dataclasses.fields(OPSDConfig)
                if type(None) in typing.get_args(hints[f.name])}
    for action in parser._actions:
        if action.dest in optional and action.type is not None:
            action.type = _or_null(action.type)
    return parser


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _integers(text: str) -> list[int]:
    try:
        return [int(t) for t in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None


def _or_null(parse):
    def parse_or_null(text: str):
        return None if text.strip().lower() in ("null", "none", "~") else parse(text)

    parse_or_null.__name__ = getattr(parse, "__name__", "value")  # argparse names it in errors
    return parse_or_null


def _explicit_values(command: str, argv: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config fields given on the command line (only those), and the command's own flags.
    Unknown flags are command-line errors, with the closest known flag suggested."""
    parser = _config_parser(command)
    fields = set(_field_names())
    own = {a.dest for a in parser._actions} - {"help"} - fields
    parser.parse_known_args(argv)  # --help (showing the defaults) and malformed values
    for action in parser._actions:  # absent flags stay absent (set_defaults would not do it)
        if action.dest in fields:
            action.default = argparse.SUPPRESS
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [s for a in parser._actions for s in a.option_strings]
        flag = next((u.split("=")[0] for u in unknown if u.startswith("--")), unknown[0])
        close = difflib.get_close_matches(flag, flags, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        parser.error(f"unrecognized argument {flag}{hint}")
    values = vars(namespace)
    flags = {name: values.pop(name) for name in own if name in values}
    return values, flags


def _field_names() -> list[str]:
    import dataclasses

    from opsd_kernels.trainer.config import OPSDConfig

    return [f.name for f in dataclasses.fields(OPSDConfig)]


def _config(path: str | None, values: dict[str, Any]):
    from opsd_kernels.trainer.config import OPSDConfig

    if path is None:
        return OPSDConfig.from_dict(values, source="command line")
    return OPSDConfig.from_yaml(path, values)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, rest = _parser().parse_known_args(argv)
        if rest and args.command not in _CONFIG_COMMANDS:
            raise CommandLineError(f"unrecognized arguments: {' '.join(rest)} "
                                   f"(see opsd {args.command} --help)")
        _run(args, rest)
    except CommandLineError as e:
        _fail(argv, str(e))
    except (ValueError, FileNotFoundError) as e:  # bad config or data: the message says what
        _fail(argv, str(e))
    except TrainingStopped as e:
        _fail(argv, str(e), status=1)


def _fail(argv: list[str], message: str, status: int = 2) -> NoReturn:
    command = next((a for a in argv if not a.startswith("-")), None)
    prefix = f"opsd {command}" if command in (*_CONFIG_COMMANDS, "bench", "env") else "opsd"
    print(f"{prefix}: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(status)


def _run(args: argparse.Namespace, rest: list[str]) -> None:
    if args.command in _CONFIG_COMMANDS:
        values, flags = _explicit_values(args.command, rest)
    if args.command == "train":
        from opsd_kernels.trainer.models import load_model_and_tokenizer
        from opsd_kernels.trainer.trainer import OPSDTrainer

        config = _config(flags["config"], values)
        if config.train_data is None:
            raise ValueError("config.train_data: required for opsd train (--train_data FILE, "
                             "or train_data: in the config file)")
        model, tokenizer = load_model_and_tokenizer(config)
        trainer = OPSDTrainer(model, tokenizer, config.train_data, config,
                              eval_dataset=config.eval_data)
        history = trainer.train()
        if trainer.is_main:
            print(trainer.summary(history), flush=True)
    elif args.command == "eval":
        from opsd_kernels.trainer.evaluate import evaluate_checkpoint

        config = _config(flags["config"], values)
        print(json.dumps(evaluate_checkpoint(config, flags["checkpoint"])))
    elif args.command == "demo":
        from opsd_kernels.trainer.demo import run_demo

        run_demo(values)
    elif args.command == "compare":
        from opsd_kernels.trainer.comparison import run_comparison

        config = _config(flags["config"], values)
        run_comparison(config, methods=flags["methods"], seeds=flags["seeds"],
                       eval_every=flags["eval_every"], eval_samples=flags["eval_samples"],
                       out=flags["out"], tag=flags["tag"])
    elif args.command == "bench":
        from opsd_kernels.compare import run_comparison

        run_comparison(args.tokens, args.hidden, args.vocab)
    elif args.command == "env":
        from opsd_kernels import env_report

        for name, status in env_report().items():
            print(f"{name:8} {status}")


if __name__ == "__main__":
    main()
