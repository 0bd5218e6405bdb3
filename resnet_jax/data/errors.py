"""The error every data problem a user has to fix is reported as."""


class DatasetError(ValueError):
    """A problem with the data or its configuration that the user has to fix."""
