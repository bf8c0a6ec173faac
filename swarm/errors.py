"""The exception types that reach users as a single line.

Anything a user can fix (a bad config, a missing file, a record without the needed
fields) is raised as ``UserError``; the CLI prints ``error: <message>`` and exits with
status 2. A run that started but could not finish (a full disk, a Ray that died, machines
the job no longer fits) is a ``RunFailure``: the same one line, exit status 1. Everything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; its message says what and how, in one line."""

    exit_status = 2


class RunFailure(UserError):
    """A run that stopped before its end; the message says what happened and what is kept."""

    exit_status = 1
