"""The one error type for input a user can fix.

Everything that refuses a model, a plan, a file, an option or a number the user gave raises
`HeadshareError` (a ValueError, so Python callers that catch ValueError keep working). The command line
turns exactly these into one line and exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class HeadshareError(ValueError):
    """Bad input: a model, plan, file, option or value headshare refuses, with a message saying why."""
