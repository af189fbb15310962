"""Named exceptions. Every message says what was received, what was expected and how to fix it."""


class LineguardError(Exception):
    """Base of every error lineguard reports to a user as one line."""


class ConfigError(LineguardError):
    """A wrong option or configuration value."""


class WeightsError(LineguardError):
    """Backbone weights missing, unreadable or of the wrong architecture."""


class InputError(LineguardError):
    """An input batch or image that does not fit the model."""


class MissingExtraError(LineguardError):
    """An optional dependency is not installed; the message names the extra."""


class ArtifactError(LineguardError):
    """A model directory or compiled engine that is missing, incomplete, altered or of an unknown format."""
