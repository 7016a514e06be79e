"""The one reader of training data, by its public names: the options and formats
(:mod:`~fishertune.data.options`), format detection and normalization
(:mod:`~fishertune.data.normalize`), the streaming JSON reader
(:mod:`~fishertune.data.json_records`), the sources (:mod:`~fishertune.data.readers`) and the
bad-row policy with the cached rows (:mod:`~fishertune.data.prepare`, whose docstring walks
through a read). Code inside ``fishertune.data`` imports those modules directly."""

from __future__ import annotations

from fishertune.data.json_records import iter_json_array, iter_jsonl
from fishertune.data.normalize import detect_format, normalize_record
from fishertune.data.options import (
    DATA_FORMATS,
    DEFAULT_COLUMNS,
    DEFAULT_ROLES,
    DROP_REASONS,
    HELP,
    DataOptions,
    add_data_arguments,
)
from fishertune.data.prepare import READER_VERSION, PreparedRows, check_source, prepare_rows

__all__ = [
    "DATA_FORMATS",
    "DEFAULT_COLUMNS",
    "DEFAULT_ROLES",
    "DROP_REASONS",
    "HELP",
    "READER_VERSION",
    "DataOptions",
    "PreparedRows",
    "add_data_arguments",
    "check_source",
    "detect_format",
    "iter_json_array",
    "iter_jsonl",
    "normalize_record",
    "prepare_rows",
]
