"""Errors the io layer raises: all ValueErrors, so callers and the CLI report them in one line."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose tensors do not fit the model."""
