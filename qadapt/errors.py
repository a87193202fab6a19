"""The one exception a user should see: a message, no traceback (the CLI prints it and exits 2)."""


class QadaptError(Exception):
    """Bad input from the user: a recipe key, a value, a path, a model that cannot be used."""
