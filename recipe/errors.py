"""Errors caused by the user's input (config, files, data): reported as one line, never a traceback."""


class UserError(Exception):
    """Bad input the user can fix. The message names the key or file and says what to change."""


class ConfigError(UserError):
    """A job config key has a bad value, type or combination."""
