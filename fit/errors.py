"""The one exception the fitting stage raises for bad input."""


class FitError(Exception):
    """Bad runs table, bad law parameters, or a fit that cannot be done; the message says which."""
