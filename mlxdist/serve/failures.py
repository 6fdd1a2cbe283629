"""Which ranks a failure names: read once, on the rank that caught the error, and sent as a field.

mlxdist's deadline and peer-loss errors name the ranks at fault in their
message (``ranks not responding: [1]``, ``rank 1 was lost``); the engine
reads them here from the error it caught and puts them in its ``failed``
link message, so the front door never matches error text.
"""

from __future__ import annotations

import re
from typing import Optional, Union

__all__ = ["lost_ranks"]

# The watchdog's own finding of a silent rank beats "not arrived" (the stalled rank's waiting neighbours).
_SILENT = re.compile(r"ranks not responding: \[([0-9, ]+)\]")
# How mlxdist's errors and the launcher's reports name the ranks at fault, the most specific first.
_NAMED = (
    re.compile(r"ranks not arrived: \[([0-9, ]+)\]"),
    re.compile(r"rank\(s\) \[([0-9, ]+)\]"),
    re.compile(r"rank ([0-9]+) (?:was lost|was killed|exited|died|left|stopped)"),
)


def lost_ranks(failure: Union[BaseException, str], own_rank: Optional[int] = None) -> list[int]:
    """The ranks a failure names as lost or stalled (best effort), without the reporting rank.

    Args:
        failure: The error caught (or its message).
        own_rank: The rank that caught it (never named as lost), or None.

    Returns:
        The ranks, sorted; empty when the failure names none.
    """
    message = str(failure)
    for pattern in (_SILENT, *_NAMED):
        ranks = {int(r) for match in pattern.finditer(message) for r in re.findall(r"[0-9]+", match.group(1))}
        ranks.discard(-1 if own_rank is None else own_rank)
        if ranks:
            return sorted(ranks)
    return []
