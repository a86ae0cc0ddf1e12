"""The one exception the training stage raises for bad input."""


class TrainError(Exception):
    """Bad model directory, data, store or configuration for training; the message says which."""
