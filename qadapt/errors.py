"""The one exception a user should see: a message, no traceback (the CLI prints it and exits 2)."""


class QadaptError(Exception):
    """Bad input from the user: a recipe key, a value, a path, a model that cannot be used."""


class TrainingStopped(QadaptError):
    """A run stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint; not a failure of the input."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
