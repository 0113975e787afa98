"""How an accepted request ended: the message handed to the completion callback."""

from __future__ import annotations

from enum import Enum

__all__ = ["StreamStatus"]


class StreamStatus(str, Enum):
    """The four outcomes of an accepted request; each compares equal to its plain string.

    >>> StreamStatus.SUCCESS == "success"
    True
    """

    SUCCESS = "success"
    CLIENT_DISCONNECTED_WHILE_STREAMING = "client_disconnected_while_streaming"
    CLIENT_DISCONNECTED_BEFORE_STREAMING = "client_disconnected_before_streaming"
    UNKNOWN_ERROR_OCCURRED = "unknown_error_occurred"

    def __str__(self) -> str:
        return self.value
