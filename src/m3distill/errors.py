"""The one exception type for errors a user can cause (bad paths, bad config, incomplete inputs).

The CLI prints such an error as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class M3DistillError(ValueError):
    """A problem with the user's inputs or environment, with a message that says what to do."""
