"""`rftbench`: thin command line. Parse, call the function that owns the work, print, exit.

Positional `key=value` words are Hydra overrides (`study=paper dataset=caltech101,flowers102`);
`--flags` are the command's own. Each command's implementation is imported only when called,
so `rftbench query` never imports torch.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from benchmark.errors import RFTBenchError

FORMATS = ("table", "json")


def _overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides")


def _format(parser: argparse.ArgumentParser, choices: Sequence[str] = FORMATS) -> None:
    parser.add_argument("--format", choices=choices, default=choices[0])


def _wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true", help="block until the submitted cells end")


# command: (implementation "module:function", help, how to add its arguments)
COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "plan": ("benchmark.sweep:plan_command", "expand a study into cells and show their states",
             lambda p: (_overrides(p), _format(p))),
    "show": ("benchmark.show:show_command", "one cell's resolved config and where its values came from",
             lambda p: (p.add_argument("cell", help="a cell id or slug"), _overrides(p), _format(p, ("yaml", "json")))),
    "launch": ("benchmark.sweep:launch_command", "run or submit every pending cell of a study",
               lambda p: (_overrides(p), _wait(p))),
    "status": ("benchmark.sweep:status_command", "counts per state and the failed cells",
               lambda p: (_overrides(p), _format(p),
                          p.add_argument("--watch", nargs="?", type=float, const=10.0, default=None,
                                         metavar="SECONDS", help="refresh every SECONDS (10)"))),
    "resume": ("benchmark.sweep:resume_command", "resubmit only the failed and missing cells",
               lambda p: (_overrides(p), _wait(p))),
    "evaluate": ("benchmark.reevaluate:evaluate_command",
                 "measure done cells under the conditions they lack, from their kept weights (no retraining)",
                 _overrides),
    "cancel": ("benchmark.sweep:cancel_command", "cancel the queued and running cells of a study",
               _overrides),
    "collect": ("benchmark.tables:collect_command", "merge cell rows into the study's tables",
                _overrides),
    "query": ("benchmark.query:query_command", "run read-only SQL over a study's tables",
              lambda p: (p.add_argument("sql"), _overrides(p),
                         _format(p, ("table", "csv", "json", "markdown")))),
    "import-reference": ("benchmark.reference:import_command",
                         "import the study authors' published per-cell results",
                         lambda p: (p.add_argument("path"), _overrides(p))),
    "export": ("benchmark.archive:export_command",
               "write a study's results (no checkpoints) to one archive file",
               lambda p: (_overrides(p), p.add_argument("--out", required=True, metavar="FILE"))),
    "import-study": ("benchmark.archive:import_command",
                     "merge an exported study archive into the local results, cell by cell",
                     lambda p: (p.add_argument("path", metavar="FILE"), _overrides(p))),
    "compare": ("analysis.compare:compare_command",
                "compare two studies' results cell by cell (study=A study=B)",
                lambda p: (_overrides(p), _format(p), p.add_argument("--out", default=None))),
    "figures": ("analysis.report:figures_command", "regenerate the study's tables and figures",
                lambda p: (_overrides(p), p.add_argument("--out", required=False, default=None))),
    "prepare-data": ("benchmark.prepare:prepare_command",
                     "convert a raw dataset into the prepared layout (dataset=NAME source=DIR)",
                     _overrides),
    "tune": ("benchmark.tune:tune_command", "search each cell's hyper-parameters (Optuna + ASHA)",
             lambda p: (_overrides(p), _format(p),
                        p.add_argument("--status", action="store_true", help="trials per cell and best value"),
                        p.add_argument("--export", metavar="PATH", help="also write the table of best values here"))),
    "fetch-weights": ("benchmark.models:fetch_weights_command",
                      "download a study's pretrained weights into the local cache", _overrides),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (for help and errors) and one parser per command."""
    parser = argparse.ArgumentParser(prog="rftbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {}
    for name, (_, help_text, add_arguments) in COMMANDS.items():
        commands[name] = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(commands[name])
    return parser, commands


def parse(argv: Sequence[str]) -> argparse.Namespace:
    # Overrides and --flags may come in any order, which only parse_intermixed_args allows, and
    # it refuses subparsers: so pick the command first, then parse the rest with its parser.
    parser, commands = build_parser()
    if not argv or argv[0] not in commands:
        parser.parse_args(argv)  # prints usage or the error, and exits
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    module_name, function_name = COMMANDS[args.command][0].split(":")
    command = getattr(importlib.import_module(module_name), function_name)
    try:
        return int(command(args) or 0)
    except RFTBenchError as err:
        print(f"rftbench {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"rftbench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
