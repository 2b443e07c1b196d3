"""The one exception type that the scripts turn into a clear message and a non-zero exit."""


class PipelineError(Exception):
    """A problem with the user's input: bad data, a missing file, an impossible setting.

    The message must name the file or value at fault; scripts print it without a traceback.
    """
