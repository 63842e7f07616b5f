"""Data side of sftray: sources -> formats -> chat encoding with checked masks -> packing -> mixing -> pipeline."""

from sftray.data.chat import IGNORE_INDEX, encode_chat
from sftray.data.errors import DataError, FormatError, MaskError, MessageError

__all__ = ["IGNORE_INDEX", "DataError", "FormatError", "MaskError", "MessageError", "encode_chat"]
