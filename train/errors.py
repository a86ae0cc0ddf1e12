"""The one exception the training stage raises for bad input."""

from kdcache.errors import KdcacheError


class TrainError(KdcacheError):
    """Bad model directory, data, store or configuration for training; the message says which."""
