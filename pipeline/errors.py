"""The one exception the pipeline (data preparation, teachers, jobs) raises for bad input."""

from kdcache.errors import KdcacheError


class PipelineError(KdcacheError):
    """Bad source data, teacher, or job configuration; the message names the file and field."""
