"""The root of every error kdcache raises for bad input, bad data or corruption.

Each package subclasses it (`StoreError`, `FitError`, `TrainError`, `PipelineError`), so
the command line catches one type and prints its message as one line. It lives in the
root package, which imports nothing, so `storage` and `fit` still depend on no other
kdcache package.
"""


class KdcacheError(Exception):
    """A refused input or detected fault; the message names the file and the field."""


class HubError(KdcacheError):
    """A Hugging Face Hub id that cannot be resolved: not in the cache while offline, not on
    the Hub, or a snapshot lacking the files kdcache reads."""
