"""`python -m entrypoint COMMAND`: one dispatcher, one logging format, one exit-code mapping."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from entrypoint.errors import ExitCode, exit_code_for, finish

COMMANDS = {
    "train": "Train (or skip, or resume) as configured by the environment.",
    "check": "Validate the configuration and data, print the plan and the decision; change nothing.",
    "merge": "Merge the trained adapter into the base model and publish it for vLLM.",
    "vllm-lora": "Check whether vLLM can serve the adapter without merging; print the flags and load request.",
    "webui": "Run LLaMA Board (LLaMA-Factory's WebUI) with its working directory on the storage.",
    "demo": "Run the whole flow locally on a generated tiny model (no GPU, no cluster).",
    "config": "Print the configuration reference (every variable, default and allowed values).",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # a wrong command line is a configuration error too
        self.print_usage(sys.stderr)
        raise SystemExit(finish(ExitCode.CONFIG, f"usage: {message}"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m entrypoint",
        description="The llama-factory-train image's commands. Configuration comes from the environment "
        "(`python -m entrypoint config` lists every variable).",
        epilog="Exit codes: 0 done or skipped; 1 unexpected (retriable); 75 temporarily unavailable (retriable); "
        "78 configuration or input error (not retried); 143 interrupted by SIGTERM (the rerun resumes).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == "demo":
            cmd.add_argument("--storage", default="./local-storage",
                             help="local folder laid out like /storage (default: ./local-storage)")
            cmd.add_argument("--steps", type=int, default=None, help="training steps (default: enough to learn)")
    worker = sub.add_parser("_worker", help=argparse.SUPPRESS)
    worker.add_argument("spec")
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    if os.environ.get("RANK", "0") != "0":  # only rank 0 speaks
        logging.getLogger().setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(os.environ.get("LOG_LEVEL", "INFO").upper())
    try:
        if args.command == "_worker":
            from entrypoint import worker

            return worker.main(args.spec)
        if args.command == "config":
            from entrypoint.settings import reference_markdown

            print(reference_markdown())
            return 0
        if args.command == "demo":
            from entrypoint import demo

            return demo.run(args.storage, steps=args.steps)
        from entrypoint.settings import load_settings

        settings = load_settings()
        setup_logging(settings.log_level)
        if args.command == "train":
            from entrypoint import train

            return train.run(settings)
        if args.command == "check":
            from entrypoint import check

            return check.run(settings)
        if args.command == "merge":
            from entrypoint import merge

            return merge.run(settings)
        if args.command == "vllm-lora":
            from entrypoint import merge

            return merge.vllm_lora(settings)
        if args.command == "webui":
            from entrypoint import webui

            return webui.run(settings)
        raise AssertionError(args.command)
    except BaseException as exc:  # the one place every failure becomes an exit code
        if isinstance(exc, SystemExit):
            raise
        code = exit_code_for(exc)
        if code == ExitCode.INTERNAL:
            logging.getLogger("entrypoint").exception("unexpected failure")
        return finish(code, str(exc) or type(exc).__name__)
