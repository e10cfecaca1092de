#!/usr/bin/env python3
"""Write the README's flag tables from the commands' live ``--help`` (their defaults come from ldm.defaults).

    python scripts/readme_flags.py          # rewrite the tables in README.md
    python scripts/readme_flags.py --check  # exit 1 when README.md differs from the generated tables

Each table sits between ``<!-- flags: COMMAND -->`` and ``<!-- /flags -->`` in README.md.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- flags: (?P<command>[\w-]+) -->\n)(?P<table>.*?)(<!-- /flags -->)", re.S)


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _parts(annotation):
    """(value type, typer OptionInfo / ArgumentInfo) of an ``Annotated[...]`` parameter annotation."""
    args = typing.get_args(annotation)
    base, info = args[0], args[1]
    inner = [a for a in typing.get_args(base) if a is not type(None)]
    return (inner[0] if inner else base), info


def _metavar(kind) -> str:
    if kind is bool:
        return ""
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return " {" + "\\|".join(str(member.value) for member in kind) + "}"
    if typing.get_origin(kind) is list:
        return " TEXT"
    return " " + {int: "INT", float: "NUM", str: "TEXT"}.get(kind, "PATH")


def _default(kind, info, default) -> str:
    shown = info.show_default
    if isinstance(info, typer.models.ArgumentInfo):
        return "required" if default is inspect.Parameter.empty else "optional"
    if isinstance(shown, str):
        return shown
    if kind is bool:
        return "off"
    if default is None or shown is False:
        return "none"
    if default == "":
        return "empty"
    value = getattr(default, "value", default)
    if isinstance(value, (list, tuple)):
        return "none" if not value else ", ".join(map(str, value))
    return f"`{value}`"


def table(command: str) -> str:
    """The markdown table of ``sdgen COMMAND``'s flags, in --help order, from the command function's typer
    declarations (each flag's ``show_default`` text comes from ldm.defaults)."""
    from ldm.cli.app import COMMANDS

    module_name, _, func_name = dict(COMMANDS)[command].partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    hints = typing.get_type_hints(func, include_extras=True)
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for name, param in inspect.signature(func).parameters.items():
        kind, info = _parts(param.annotation if not isinstance(param.annotation, str) else hints[name])
        if isinstance(info, typer.models.ArgumentInfo):
            label = f"`{info.metavar or name.upper()}` (argument)"
        else:
            # in Annotated form typer.Option's first positional (its "default") is the first flag name
            first = (info.default,) if isinstance(info.default, str) and info.default.startswith("-") else ()
            decls = first + tuple(info.param_decls or ()) or ("--" + name.replace("_", "-"),)
            label = " ".join(f"`{d}`" for d in decls) + _metavar(kind)
        rows.append(f"| {label} | {_cell(_default(kind, info, param.default))} | {_cell(info.help or '')} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    """README text with every flags block regenerated."""
    return BLOCK.sub(lambda m: m.group(1) + table(m.group("command")) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the README is stale")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("README.md flag tables are stale: run python scripts/readme_flags.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
