"""Griffe extension: Sphinx cross-reference roles in docstrings shown as code.

mlxdist's docstrings name other objects the Sphinx way (:class:`Group`,
:func:`mlxdist.init`, :mod:`~mlxdist.errors`); Markdown has no such roles, so
the reference would print them verbatim. This turns each into inline code
(the last dotted part for ``~`` targets, as Sphinx shows them).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

__all__ = ["ROLE", "plain", "SphinxRoles"]

ROLE = re.compile(r":(?:py:)?(?:mod|class|func|meth|attr|data|exc|obj|const):`(?P<tilde>~?)!?(?P<target>[^`]+)`")


def plain(text: str) -> str:
    """``text`` with every Sphinx role replaced by inline code of its target.

    Args:
        text: A docstring.

    Returns:
        The docstring in Markdown's terms.
    """

    def code(match: re.Match[str]) -> str:
        target = match.group("target")
        return f"`{target.rsplit('.', 1)[-1] if match.group('tilde') else target}`"

    return ROLE.sub(code, text)


class SphinxRoles(griffe.Extension):
    """Rewrite each object's docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Griffe event: an object was created from the sources."""
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
