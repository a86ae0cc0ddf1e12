"""The one exception the store raises for bad input, bad data and corruption."""

from kdcache.errors import KdcacheError


class StoreError(KdcacheError):
    """A store operation refused or failed; the message names the store and the field."""
