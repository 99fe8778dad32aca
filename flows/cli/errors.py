"""How a command ends: the CLI's error policy, in one place.

- A ``pipelines.errors.UserError`` (bad argument, config, input, model, or a server that does
  not answer) is one line on stderr, ``fcn CMD: error: …``, exit 2.
- A failed stage (``StageFailed``) or Ray job (``JobFailed``) is the one line they carry (the
  resume hint, the job's own error); exit 2 when the job failed on a user's mistake, else 1.
- Anything else is a bug: its traceback, then a line saying so, exit 1.
Every line is redacted (no secret from the environment or a URI reaches the terminal).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable

BUG_LINE = ("this is a bug in fcn, not a problem with your input: please report it with the "
            "command line and the traceback above")


class _OneLineFailures(logging.Filter):
    """Drops Prefect's records that carry a one-line failure's traceback: a mistake in the
    input (``UserError``), a failed Ray job or stage. Prefect logs each with its traceback
    where it is raised (the task's cache key, the task, every flow it passes through), ~70
    lines apiece, before the command's own line; its state lines ("Finished in state
    Failed('…')") stay. ``-v`` keeps everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pipelines.errors import UserError
        from pipelines.jobs import JobFailed
        from pipelines.ray_env import verbose
        from pipelines.train import StageFailed

        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, UserError | JobFailed | StageFailed) or verbose()


def quiet_prefect_tracebacks() -> None:
    """Install ``_OneLineFailures`` on the loggers of Prefect's flow and task runs (before
    or after Prefect configures logging: its dictConfig keeps a logger's filters)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OneLineFailures) for f in logger.filters):
            logger.addFilter(_OneLineFailures())


def _redact(text: str) -> str:
    from pipelines.storage import redact

    return redact(text)


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    from pipelines.errors import UserError
    from pipelines.jobs import JobFailed
    from pipelines.train import StageFailed

    command = args.command
    try:
        return func(args)
    except UserError as exc:
        print(f"fcn {command}: error: {_redact(str(exc))}", file=sys.stderr)
        return 2
    except JobFailed as exc:  # the job's own line; a user's mistake exits 2
        print(f"fcn {command}: {_redact(str(exc))}", file=sys.stderr)
        return 2 if exc.usage else 1
    except StageFailed as exc:
        print(f"fcn {command}: {_redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # with what to do next, where the command knows it
        notes = "".join(f"; {note}" for note in getattr(exc, "__notes__", ()))
        print(f"fcn {command}: interrupted{notes}", file=sys.stderr)
        return 130
    except Exception:
        print(_redact(traceback.format_exc()), file=sys.stderr, end="")
        print(f"fcn {command}: {BUG_LINE}", file=sys.stderr)
        return 1
