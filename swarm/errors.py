"""The one exception type that reaches users as a single line.

Anything a user can fix (a bad config, a missing file, a record without the needed
fields) is raised as ``UserError``; the CLI prints ``error: <message>`` and exits with
status 2. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; its message says what and how, in one line."""
