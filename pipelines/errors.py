"""The one exception family for a user's mistake.

A ``UserError`` is something the user can fix: a bad argument, a bad config, a missing or
unreadable input, an unknown model, a server that does not answer. The CLI prints its message
as one line (``fcn CMD: error: …``) and exits 2; Prefect does not retry it unless it is
``transient`` (a server that may answer later). Every other exception is a bug: the CLI shows
its traceback and exits 1.

Messages name the thing (a field, a file, a location, a URI) and, where there is one, the fix.
They never carry a secret (the CLI redacts them again before printing).
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; one line, exit 2, never a traceback."""

    #: True when the same call may pass later (an unreachable server): Prefect retries it.
    transient: bool = False


class UsageError(UserError):
    """A bad command-line argument or combination of arguments."""


class ServiceUnavailable(UserError):
    """A server (MLflow, S3, Ray, Prefect) that does not answer or answers with an error."""

    transient = True
