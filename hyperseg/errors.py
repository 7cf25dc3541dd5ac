"""Exceptions shared by several modules (kept here so that none of them imports another for them)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the model."""
