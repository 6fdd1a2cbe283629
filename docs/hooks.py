"""MkDocs hook: the documentation's tables that state facts of the code, generated from it.

A page asks for a table with a marker on a line of its own::

    <!-- generate: capabilities -->
    <!-- generate: errors -->
    <!-- generate: options mlxdist.serve.cli:build_parser -->

``capabilities`` renders :data:`mlxdist.backends.CAPABILITIES` (which operation
each backend provides, and how mlxdist fills in the rest), ``errors`` the
exception classes of :mod:`mlxdist.errors` with the builtins they also are,
and ``options MODULE:FUNCTION`` the options of the :class:`argparse.ArgumentParser`
that FUNCTION returns. An unknown marker fails the build, so a page never
shows a marker instead of its table.
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import inspect
import re
from typing import Any, Callable

__all__ = [
    "MARKER",
    "capability_table",
    "error_table",
    "options_table",
    "parser_factory",
    "expand",
    "on_page_markdown",
]

MARKER = re.compile(r"^<!--\s*generate:\s*(?P<kind>[\w-]+)(?:\s+(?P<arg>\S+))?\s*-->$", re.MULTILINE)

# recv_like is a receive whose shape and dtype come from an array.
_LABELS = {"recv": "recv, recv_like"}
_REDUCTIONS = ("all_sum", "all_max", "all_min")
_POINT_TO_POINT = ("send", "recv")


def _cell(caps: Any, op: str, fill_ins: dict[str, tuple[str, ...]]) -> str:
    status = caps.status(op)
    if status == "native" and op in _POINT_TO_POINT and caps.neighbours_only:
        return "native, neighbours only"
    if status == "native" and op in _REDUCTIONS and not caps.bool_reductions:
        return "native (bool: mlxdist, as uint8)"
    if status == "mlxdist":
        return f"mlxdist (from {', '.join(fill_ins[op])})"
    return status


def capability_table() -> str:
    """The backends-and-operations table, from :data:`mlxdist.backends.CAPABILITIES`.

    Consecutive operations whose cells agree on every backend share a row.

    Returns:
        A Markdown table: one column per backend, one row per operation group.
    """
    from mlxdist.backends import CAPABILITIES, FILL_INS, OPERATIONS

    backends = list(CAPABILITIES)
    rows: list[tuple[list[str], list[str]]] = []
    for op in OPERATIONS:
        cells = [_cell(CAPABILITIES[b], op, FILL_INS) for b in backends]
        if rows and rows[-1][1] == cells:
            rows[-1][0].append(op)
        else:
            rows.append(([op], cells))
    lines = [
        "| operation | " + " | ".join(b.value for b in backends) + " |",
        "|---" * (len(backends) + 1) + "|",
    ]
    for ops, cells in rows:
        label = ", ".join(_LABELS.get(op, op) for op in ops)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def error_table() -> str:
    """The exception classes of :mod:`mlxdist.errors`, in the module's order.

    Returns:
        A Markdown table: each class, the mlxdist classes it derives from
        directly, the builtin exceptions it also is (RuntimeError only on
        DistributedError's row, which every other class derives from), and
        its docstring's first paragraph.
    """
    import mlxdist
    from mlxdist import errors

    lines = [
        "| class | derives from | also a | raised for |",
        "|---|---|---|---|",
    ]
    for name in errors.__all__:
        cls = getattr(errors, name)
        parents = [b.__name__ for b in cls.__bases__ if b.__module__ == errors.__name__]
        also = [
            b.__name__
            for b in cls.__mro__[1:]
            if getattr(builtins, b.__name__, None) is b and b not in (BaseException, Exception, object)
            # Every class is a RuntimeError through DistributedError: said once, on its row.
            and (b is not RuntimeError or cls is errors.DistributedError)
        ]
        where = f"`mlxdist.{name}`" if name in mlxdist.__all__ else f"`mlxdist.errors.{name}`"
        lines.append(
            f"| {where} | {', '.join(f'`{p}`' for p in parents) or '—'} | "
            f"{', '.join(f'`{b}`' for b in also) or '—'} | {_summary(cls)} |"
        )
    return "\n".join(lines)


def parser_factory(target: str) -> Callable[[], argparse.ArgumentParser]:
    """The function that ``MODULE:FUNCTION`` names.

    Args:
        target: An options marker's argument.

    Returns:
        The function, which builds a command's parser.

    Raises:
        ValueError: ``target`` names no function.
    """
    module, _, function = target.partition(":")
    if not function:
        raise ValueError(f"options needs MODULE:FUNCTION, got {target!r}")
    return getattr(importlib.import_module(module), function)


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
    if action.nargs == 0:
        return flags
    if action.choices is not None:
        return f"{flags} `{{{','.join(str(c) for c in action.choices)}}}`"
    return f"{flags} `{action.metavar or action.dest.upper()}`"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def options_table(parser: argparse.ArgumentParser) -> str:
    """A command's options, from its parser.

    Args:
        parser: The command's parser.

    Returns:
        The usage line in a code block, then a Markdown table of every option
        (but ``--help`` and the hidden ones): how it is written and its
        description, with its default where the description does not state it.
    """
    lines = [
        "```text",
        parser.format_usage().strip(),
        "```",
        "",
        "| option | description |",
        "|---|---|",
    ]
    for action in parser._actions:  # argparse has no public iterator over its actions
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        text = (action.help or "") % {**vars(action), "prog": parser.prog}
        if action.required:
            text = f"{text} (required)".strip()
        elif "default" not in text and action.default not in (None, False, argparse.SUPPRESS):
            text = f"{text} (default `{action.default}`)".strip()
        lines.append(f"| {_invocation(action)} | {_escape(text)} |")
    return "\n".join(lines)


def expand(markdown: str) -> str:
    """Replace every generate marker of a page by its table.

    Args:
        markdown: The page's Markdown.

    Returns:
        The Markdown with the tables in place of the markers.

    Raises:
        ValueError: An unknown marker, or ``options`` without a target.
    """

    def render(match: re.Match[str]) -> str:
        kind, arg = match.group("kind"), match.group("arg")
        if kind == "capabilities" and arg is None:
            return capability_table()
        if kind == "errors" and arg is None:
            return error_table()
        if kind == "options" and arg is not None:
            return options_table(parser_factory(arg)())
        raise ValueError(f"unknown generate marker: {match.group(0)}")

    return MARKER.sub(render, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: expand the page's generate markers.

    Raises:
        mkdocs.exceptions.PluginError: a marker that cannot be expanded.
    """
    from mkdocs.exceptions import PluginError

    try:
        return expand(markdown)
    except Exception as exc:
        raise PluginError(f"{page.file.src_path}: {exc}") from exc
