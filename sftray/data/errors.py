"""Data errors: one exception family whose ``reason`` code is what drop counts are keyed by."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message names the file/line or example; ``reason`` is a short code for drop counts."""

    reason = "bad_row"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class FormatError(DataError):
    """A record does not match its (declared or detected) conversation format."""

    reason = "bad_format"


class MessageError(DataError):
    """A conversation is malformed, or the chat template rejects it."""

    reason = "bad_message"


class MaskError(DataError):
    """A loss mask cannot be derived or fails verification."""

    reason = "mask_error"
