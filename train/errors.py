"""The errors the CLI reports as one line (kept free of heavy imports)."""

import signal


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, or not one of ours."""


class NonFiniteLossError(RuntimeError):
    """Training (or evaluation) loss became NaN or inf."""


class Interrupted(Exception):
    """A run stopped by SIGTERM or SIGINT after writing a checkpoint; the CLI exits with 128 + the signal number
    (143 for SIGTERM, 130 for SIGINT), as a shell reports a process killed by that signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name
