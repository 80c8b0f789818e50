"""Train, evaluate, sample, inspect and benchmark models, and run the method studies.

Each command is a module with ``add_arguments(parser)`` and ``run(args)``: the engine's are listed here, and every
study under ``train/studies/`` adds its own (``COMMANDS`` in its ``__init__``), so a new method touches no engine
file. Only the module of the command that runs is imported: ``--help`` and config errors are instant.

Exit status: 0 done; 2 bad input (config, checkpoint, arguments, a missing file), one ``error:`` line; 1 a
failure while running (a non-finite loss, a write that failed), one ``error:`` line; 143 / 130 stopped by
SIGTERM / SIGINT after writing a checkpoint, one ``interrupted:`` line saying how to resume.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys

ENGINE_COMMANDS = {
    "fit": "train.fit",
    "eval": "train.evaluate",
    "sample": "train.generate",
    "info": "train.info",
    "bench": "train.bench",
}


def commands() -> dict[str, str]:
    """{command name: module}: the engine's, then every study's."""
    from .studies import discover as studies

    table = dict(ENGINE_COMMANDS)
    for study in studies():
        for name, module in study.COMMANDS.items():
            if name in table:
                raise RuntimeError(f"command {name!r} is defined twice ({table[name]}, {module})")
            table[name] = module
    return table


def docstring(module: str) -> str:
    """A module's docstring, read from its source without importing it (``--help`` stays instant)."""
    spec = importlib.util.find_spec(module)
    with open(spec.origin, encoding="utf-8") as f:
        return (ast.get_docstring(ast.parse(f.read())) or "").strip()


def build_parser(table: dict[str, str], command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command in ``table``; only ``command``'s module is imported for its arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in table.items():
        doc = docstring(module)
        p = sub.add_parser(
            name,
            help=doc.splitlines()[0].replace("%", "%%") if doc else "",
            description=doc.replace("%", "%%"),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def add_target(p: argparse.ArgumentParser, what: str) -> None:
    """The positional target of a command (a config, checkpoint or run dir) and its dotted config overrides."""
    p.add_argument("target", help=what)
    p.add_argument("overrides", nargs="*", help="config overrides, dotted.key=value (OmegaConf dotlist)")


def add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="a released checkpoint of the target config's model (the authors' torch.save file, e.g. "
        "{'model': state_dict}), converted to this repo's names and loaded strictly (weights_only=True)",
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    table = commands()
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(table, first if first in table else None)
    args, extra = parser.parse_known_args(argv)  # overrides may also follow options: ... --steps 5 a.b=1
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = list(getattr(args, "overrides", None) or []) + extra
    from arch.registry import ConfigError

    from .errors import CheckpointError, Interrupted, NonFiniteLossError

    try:
        importlib.import_module(table[args.command]).run(args)
    except (ConfigError, CheckpointError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, NonFiniteLossError) else 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a missing input (2), or a write that failed: read-only, not a folder, disk full (1)
        print(f"error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, FileNotFoundError) else 1
    return 0
