"""The one exception type for problems the user can fix (bad input, bad options, bad files)."""


class UserError(Exception):
    """Raised with a one-line message that names the problem and the fix.

    The command line prints it without a traceback and exits with status 2.
    """
