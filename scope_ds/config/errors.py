"""The error of a recipe or override that cannot run."""


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the key."""
