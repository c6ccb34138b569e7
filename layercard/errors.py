"""The one exception type users see: a one-line message that names the culprit."""


class LayercardError(Exception):
    """Bad input or an unusable state; the CLI prints ``str(err)`` on one line and exits 2."""
