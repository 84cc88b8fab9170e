"""Expected failures: exceptions whose message already says what is wrong and how to fix it.

The library raises these for bad input (a file that is missing, truncated or does not match, a value out of
range); every command turns them into one line on stderr and exit status 1 (facesiam/commands). Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class FacesiamError(Exception):
    """An expected failure; the message names the file or value and the fix."""


class InputError(FacesiamError, ValueError):
    """Bad input from the user: a file, a flag or a config value (a ValueError, for callers that catch those)."""


class ConflictError(InputError):
    """The input is well formed but clashes with what exists (a name taken): the service answers 409, not 400."""


def and_more(items) -> str:
    """After naming the first of ``items`` in a message: how many more there are (" (and 3 more)"), or ""."""
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""
