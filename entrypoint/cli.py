"""`python -m entrypoint COMMAND`: one dispatcher, one logging format, one exit-code mapping."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from entrypoint.errors import EXIT_MEANINGS, ExitCode, describe, finish, set_termination_log

# name -> (help, the module whose run(settings) performs it)
COMMANDS = {
    "train": ("Train (or skip, or resume) as configured by the environment.", "entrypoint.train"),
    "check": ("Validate the configuration and data, print the plan and the decision; change nothing.",
              "entrypoint.check"),
    "merge": ("Merge the trained adapter into the base model and publish it for vLLM.", "entrypoint.merge"),
    "vllm-lora": ("Check whether vLLM can serve the adapter without merging; print the flags and load request.",
                  "entrypoint.vllm_lora"),
    "probe": ("Check from a pod what training needs: writable storage, model, data, MLflow.", "entrypoint.probe"),
    "rollback": ("Serve an earlier published version again (atomic switch of MERGED_MODEL_PATH); move the registry "
                 "alias champion with it.", "entrypoint.rollback"),
    "verify": ("Run the publish gate's checks on a merged model directory; print the report.", "entrypoint.gate"),
    "webui": ("Run LLaMA Board (LLaMA-Factory's WebUI) with its working directory on the storage.",
              "entrypoint.webui"),
    "demo": ("Run the whole flow locally on a generated tiny model (no GPU, no cluster).", ""),
    "config": ("Print the configuration reference (every variable, default and allowed values).", ""),
}
# Arguments of the commands that take any, passed to their run(settings, **arguments).
ARGUMENTS: dict[str, tuple[tuple[tuple[str, ...], dict[str, str]], ...]] = {
    "verify": ((("directory",), {"help": "the model directory to check (a published version, or MERGED_MODEL_PATH)"}),),
    "rollback": ((("--to",), {"help": "the version to serve, e.g. v0002 (default: the newest older than the served "
                                      "one)"}),),
}
# One training process under torchrun, started by the train command itself: not for users, not in --help.
WORKER = "_worker"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # a wrong command line is a configuration error too
        self.print_usage(sys.stderr)
        raise SystemExit(finish(ExitCode.CONFIG, f"usage: {message}"))


def exit_code_epilog() -> str:
    return "Exit codes: " + "; ".join(f"{int(code)} {meaning}" for code, meaning in EXIT_MEANINGS.items()) + "."


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m entrypoint",
        description="The llama-factory-train image's commands. Configuration comes from the environment "
        "(`python -m entrypoint config` lists every variable).",
        epilog=exit_code_epilog(),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == "demo":
            cmd.add_argument("--storage", default="./local-storage",
                             help="local folder laid out like /storage (default: ./local-storage)")
            cmd.add_argument("--steps", type=int, default=None, help="training steps (default: enough to learn)")
        for args, kwargs in ARGUMENTS.get(name, ()):
            cmd.add_argument(*args, **kwargs)
    return parser


def setup_logging(level: str) -> None:
    from entrypoint.settings import process_env

    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    if process_env().rank != 0:  # only rank 0 speaks
        logging.getLogger().setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    from entrypoint.settings import early_value

    argv = list(sys.argv[1:] if argv is None else argv)
    set_termination_log(early_value("termination_log_path"))
    setup_logging(early_value("log_level").upper())
    try:
        if argv[:1] == [WORKER] and len(argv) == 2:
            return _run_settings_command(WORKER, argv[1])
        args = build_parser().parse_args(argv)
        if args.command == "config":
            from entrypoint.settings import reference_markdown

            print(reference_markdown())
            return 0
        if args.command == "demo":
            from entrypoint import demo

            return demo.run(args.storage, steps=args.steps)
        return _run_settings_command(args.command, arguments={
            k: v for k, v in vars(args).items() if k != "command"})
    except BaseException as exc:  # the one place every failure becomes an exit code
        if isinstance(exc, SystemExit):
            raise
        code, message = describe(exc)
        if code == ExitCode.INTERNAL:
            logging.getLogger("entrypoint").exception("unexpected failure")
        finish(code, message)
        if code == ExitCode.INTERRUPTED:
            # After SIGTERM the grace period runs: no interpreter teardown (libraries' exit handlers, threads
            # still waiting on a dead server) may delay the exit past it. Everything was saved and reported.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(code))
        return int(code)


def _run_settings_command(command: str, worker_spec: str = "", arguments: dict | None = None) -> int:
    """Load and validate the settings, hand the libraries their environment, run the command's module."""
    from entrypoint.settings import apply_library_env, load_settings

    settings = load_settings()
    set_termination_log(settings.termination_log_path)
    setup_logging(settings.log_level)
    apply_library_env(settings)
    if command == WORKER:
        from entrypoint import worker

        return worker.main(worker_spec, settings)
    return importlib.import_module(COMMANDS[command][1]).run(settings, **(arguments or {}))
