"""User-causable errors. The CLI prints their message as one line and exits non-zero; anything else
is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input, missing artifact or model, unknown name: the message names the cause and the fix."""
