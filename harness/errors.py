"""The one exception type for mistakes a user can make and fix."""


class HarnessError(Exception):
    """A user-fixable problem. The message names the file, the key and the fix.

    The CLI prints it without a traceback and exits with status 2.
    """
