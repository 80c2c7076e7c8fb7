"""The one exception type for problems the user can fix (bad input, bad options, bad files)."""

EXIT_USER_ERROR = 2  # the command line's exit status for a UserError or a bad command line


class UserError(Exception):
    """Raised with a one-line message that names the problem and the fix.

    The command line prints it without a traceback and exits with EXIT_USER_ERROR.
    """


def one_line(error: BaseException) -> str:
    """What an exception says, in one line: the first line of its text, else its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
