"""The one exception type that reaches users as a one-line message, never a traceback."""

__all__ = ["BakeoffError"]


class BakeoffError(Exception):
    """A problem with the user's input or environment; the message says what and how to fix it."""
