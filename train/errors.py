"""The errors the CLI reports as one ``error:`` line (kept free of heavy imports)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, or not one of ours."""


class NonFiniteLossError(RuntimeError):
    """Training loss became NaN or inf."""
