"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class BnprobeError(Exception):
    """An error caused by the user's input (bad file, bad option, bad data).

    The CLI shows ``Error: <message>`` and exits with status 2; a traceback is shown only
    with ``--debug``.
    """
