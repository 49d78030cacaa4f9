"""The one exception type for mistakes the user can fix (bad paths, options, files)."""


class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit code 2.

    The message must name the file, key or option at fault and say what is allowed.
    """
