"""The one exception type for mistakes a user can make (bad config, missing weights, bad input).

The CLI turns a `VaderError` into one line on stderr and exit status 2; anything else is a bug
and keeps its traceback.
"""


class VaderError(Exception):
    """A user-facing error whose message is one self-contained line."""
