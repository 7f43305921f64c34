"""The one exception type a user sees as a clean one-line error."""


class BioTuneError(Exception):
    """Bad input or an unusable setting: the CLI prints the message on one line and exits 2."""
