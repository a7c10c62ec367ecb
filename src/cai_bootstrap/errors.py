"""The one exception family for problems a user can fix (docs/errors.md).

A ``UserError`` is a bad file, value or command, or a run directory that is not ready for what was
asked. The command line prints it as one line, without a traceback; a step that raises one leaves
the run directory as it was (its manifest entry is not replaced by a failure).
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what is wrong and where (file, line, field)."""
