"""Errors a user can cause (bad config, missing or corrupt input, missing weights, NaN loss).

Every such error derives from `UserError`, so `ldm` ends with one line naming the culprit and exit code 2
for any of them and keeps the traceback for everything else (a bug). Each keeps the built-in base it had
before (ValueError, FileNotFoundError, RuntimeError) so existing `except` clauses still catch it.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input, not a bug: reported as one line naming the culprit."""


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message names the field."""


class EmptyDatasetError(UserError, ValueError):
    """No usable image was left after preparation."""


class CorruptShardError(UserError, RuntimeError):
    """A cache shard is missing, truncated or does not match its recorded hash; the message names it."""


class MissingWeightsError(UserError, FileNotFoundError):
    """Pretrained weights are not on this machine (and the run is offline); the message names them."""


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or inf; the last good snapshot is kept."""
