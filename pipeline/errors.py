"""The one exception the pipeline (data preparation, teachers, jobs) raises for bad input."""


class PipelineError(Exception):
    """Bad source data, teacher, or job configuration; the message names the file and field."""
