"""The error type and check every config group validates with: messages start with the key."""


class ConfigError(ValueError):
  """A bad configuration value; the message starts with the full key."""


def _check(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"{key}: {msg}")
