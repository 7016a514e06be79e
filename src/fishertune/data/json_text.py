"""A UTF-8 JSON file read as text one chunk at a time, one value decoded at a time
(:class:`JsonText`), and the one-line errors of a file that is not valid JSON or not UTF-8.
:mod:`fishertune.data.json_records` reads records through it."""

from __future__ import annotations

import codecs
import json
import re
import sys
from collections.abc import Iterator
from typing import Any

from fishertune.errors import FishertuneError, first_line

__all__ = [
    "CutOffError",
    "JsonText",
    "cut_inside_token",
    "decode_error",
    "unreadable_error",
]

_CHUNK = 1 << 20
_MAX_RECORD = 256 << 20  # characters of one JSON-array record before it is refused


def unreadable_error(where: str, err: Exception) -> FishertuneError:
    """Valid JSON that Python's reader cannot hold: ``where`` and what it is, in one line."""
    if isinstance(err, RecursionError):
        what = "arrays or objects nested too deeply to read (beyond Python's recursion limit)"
    elif "digits" in str(err):
        what = f"an integer of more than {sys.get_int_max_str_digits()} digits (Python's limit)"
    else:
        what = f"unreadable JSON ({first_line(err)})"
    return FishertuneError(f"{where}: {what}")


_NUMBER_REST = re.compile(r"(\.[0-9]*)?([eE][-+]?[0-9]*)?")
_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")


def cut_inside_token(err: json.JSONDecodeError, text: str) -> bool:
    """Whether the decoder stopped at a token that the end of ``text`` cuts short: a number's
    fraction or exponent (``1.``, ``1e+``), a literal (``tr``, ``-``) or a ``\\u`` escape."""
    tail = text[err.pos :].rstrip()
    if not tail:
        return False
    if err.msg.startswith("Invalid \\uXXXX"):
        return re.fullmatch(r"u[0-9a-fA-F]{0,3}", tail) is not None
    if err.msg == "Expecting value":
        return any(literal.startswith(tail) for literal in _LITERALS)
    if err.msg.startswith("Expecting"):  # a number read whole up to here: what follows it
        return text[err.pos - 1].isdigit() and _NUMBER_REST.fullmatch(tail) is not None
    return False


def decode_error(name: str, raw: bytes, lineno: int, err: UnicodeDecodeError) -> FishertuneError:
    """``raw`` starts at line ``lineno``: name the line and column of the bad byte."""
    line = lineno + raw.count(b"\n", 0, err.start)
    column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
    return FishertuneError(
        f"{name} line {line} column {column}: byte 0x{raw[err.start]:02x} is not UTF-8 text; "
        "save the file as UTF-8"
    )


class CutOffError(Exception):
    """The file ends inside a value: ``start``, the byte where the value begins; ``count``, the
    complete elements before it in its array."""

    def __init__(self, start: int, count: int = 0) -> None:
        super().__init__(start, count)
        self.start, self.count = start, count


class JsonText:
    """An open UTF-8 JSON file as text, read :data:`_CHUNK` bytes at a time: a buffer, a
    position in it, and one value decoded at a time (``json.JSONDecoder.raw_decode``), so
    memory stays about one chunk plus the largest value decoded."""

    def __init__(self, f: Any, name: str) -> None:
        self.f, self.name = f, name
        self.decoder = json.JSONDecoder()
        self.text_decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos = "", 0
        self.consumed_bytes = 0  # bytes before buf[0]
        self.consumed_lines = 0  # newlines before buf[0]
        self.consumed_chars = 0  # characters before buf[0]
        self.eof = False

    def more(self) -> bool:
        """Append the next chunk, dropping what is before ``pos``; False at the end."""
        if self.eof:
            return False
        raw = self.f.read(_CHUNK)
        if self.consumed_bytes == 0 and not self.buf and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
            self.consumed_bytes = len(codecs.BOM_UTF8)
        try:
            chunk = self.text_decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as err:
            if not raw:
                # the file ends inside a multi-byte character: a cut like any other, whose
                # partial character is dropped (the value it is in is incomplete anyway)
                self.eof = True
                return False
            tail = self.buf[self.buf.rfind("\n") + 1 :].encode("utf-8")  # the line so far
            lineno = self.consumed_lines + self.buf.count("\n") + 1
            raise decode_error(self.name, tail + raw, lineno, _shifted(err, len(tail))) from None
        self.eof = not raw
        done = self.buf[: self.pos]
        self.consumed_bytes += len(done.encode("utf-8"))
        self.consumed_lines += done.count("\n")
        self.consumed_chars += len(done)
        self.buf, self.pos = self.buf[self.pos :] + chunk, 0
        return bool(raw)

    def skip_ws(self) -> str:
        """The next character that is not white space ("" at the end), at ``pos``."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def where_bytes(self, p: int) -> int:
        return self.consumed_bytes + len(self.buf[:p].encode("utf-8"))

    def line(self, p: int) -> int:
        return self.consumed_lines + self.buf[:p].count("\n") + 1

    def offset(self) -> int:
        """Characters read up to ``pos``."""
        return self.consumed_chars + self.pos

    def invalid(self, what: str) -> FishertuneError:
        return FishertuneError(f"{self.name} line {self.line(self.pos)}: invalid JSON ({what})")

    def value(self, what: str) -> Any:
        """Decode the value at ``pos`` (``what`` names it in errors) and move past it.

        Raises:
            CutOffError: the file ends inside the value.
        """
        while True:
            # the error's message and position only: the exception holds the whole buffer
            # (``doc``) and, through its traceback, this frame: a cycle that keeps buffers alive
            error: tuple[str, int] | None = None
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
                # a number near the end of the buffer may go on in the next chunk ("1." + "5")
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if self.eof or not number or len(self.buf) - end > 16:
                    self.pos = end
                    return value
                at_end = True
            except json.JSONDecodeError as err:
                error = (err.msg, err.pos)
                # An error at the end of the buffer (or an unterminated string) may only mean
                # the value continues in the next chunk; at the end of the file it is cut off.
                at_end = (
                    err.msg.startswith("Unterminated string")
                    or err.pos >= len(self.buf.rstrip())
                    or cut_inside_token(err, self.buf)
                )
            except (ValueError, RecursionError) as err:
                where = f"{self.name} line {self.line(self.pos)}: {what}"
                raise unreadable_error(where, err) from None
            if not self.eof and (at_end or error[1] >= len(self.buf) - 16):
                if len(self.buf) - self.pos > _MAX_RECORD:
                    raise FishertuneError(
                        f"{self.name}: {what} (from byte {self.where_bytes(self.pos)}) runs past "
                        f"{_MAX_RECORD >> 20} MiB of text: a string that is never closed, or one "
                        "record too large to read"
                    )
                # read as much again as the value has so far (not one chunk at a time: each
                # retry decodes the value from its start)
                for _ in range(max(1, (len(self.buf) - self.pos) // _CHUNK)):
                    if not self.more():
                        break
                continue
            if at_end:
                raise CutOffError(self.where_bytes(self.pos))
            raise FishertuneError(
                f"{self.name} line {self.line(error[1])}: invalid JSON in {what} ({error[0]})"
            )

    def elements(self) -> Iterator[Any]:
        """The elements of the array whose ``[`` is at ``pos``, one at a time; ``pos`` ends
        past its ``]``.

        Raises:
            CutOffError: the file ends inside the array (``count`` complete elements before).
        """
        self.pos += 1
        count = 0
        while True:
            char = self.skip_ws()
            if char == "":
                raise CutOffError(self.where_bytes(self.pos), count)
            if char == "]":
                self.pos += 1
                return
            if count:
                if char != ",":
                    raise self.invalid(f"expected ',' or ']' after record {count - 1}")
                self.pos += 1
                if self.skip_ws() == "":
                    raise CutOffError(self.where_bytes(self.pos), count)
            try:
                record = self.value(f"record {count}")
            except CutOffError as cut:
                raise CutOffError(cut.start, count) from None
            yield record
            count += 1


def _shifted(err: UnicodeDecodeError, by: int) -> UnicodeDecodeError:
    return UnicodeDecodeError(err.encoding, err.object, err.start + by, err.end + by, err.reason)
