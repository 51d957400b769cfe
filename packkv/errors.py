"""The one exception type for mistakes a user can fix (bad files, bad flags, too long a prompt).

Command-line programs print its message as one line and exit non-zero; everything else is a bug and
keeps its traceback.
"""


class PackkvError(Exception):
    """A problem with the user's input or machine, described in one line."""
