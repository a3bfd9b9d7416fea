"""Errors that carry a message meant for the user (one line, says what was wrong and what to do)."""


class OvsegError(Exception):
    """Base class of every error the CLI and the app show to the user as a one-line message."""


class ImageError(OvsegError, ValueError):
    """An image could not be read, or is not an image the engine can use."""


class ConceptError(OvsegError, ValueError):
    """A word list is empty or malformed."""


class UnknownMethodError(OvsegError, KeyError):
    """A method name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelError(OvsegError, RuntimeError):
    """A packaged model or checkpoint could not be loaded."""
