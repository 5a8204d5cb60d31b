"""The `opsd` command line: `opsd demo`, `opsd env`."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="opsd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the fused loss beside the naive form on this device")
    demo.add_argument("--tokens", type=int, default=None)
    demo.add_argument("--hidden", type=int, default=None)
    demo.add_argument("--vocab", type=int, default=None)
    commands.add_parser("env", help="which backends are usable here, and why not")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from opsd_kernels.demo import run_demo

        run_demo(args.tokens, args.hidden, args.vocab)
    elif args.command == "env":
        from opsd_kernels import env_report

        for name, status in env_report().items():
            print(f"{name:8} {status}")


if __name__ == "__main__":
    main()
