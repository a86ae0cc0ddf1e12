"""The one exception the store raises for bad input, bad data and corruption."""


class StoreError(Exception):
    """A store operation refused or failed; the message names the store and the field."""
