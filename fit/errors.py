"""The one exception the fitting stage raises for bad input."""

from kdcache.errors import KdcacheError


class FitError(KdcacheError):
    """Bad runs table, bad law parameters, or a fit that cannot be done; the message says which."""
