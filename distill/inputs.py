"""Reading and checking input queries before any engine starts.

Inputs: a .txt file (one query a line), .jsonl, .parquet, or a folder of them; local or any pyarrow filesystem
URI. Every input row comes out of `read_queries` either as a query (id, text, gold label) or as a reject with a
specific reason, so nothing is dropped silently. A structurally wrong input (a missing column, no files) raises
`InputError` instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterator, Optional

import pyarrow.parquet as pq

from distill.storage import list_files, resolve

SUFFIXES = (".txt", ".jsonl", ".parquet")


class InputError(ValueError):
    """The input cannot be read as queries at all (as opposed to a bad row, which is rejected)."""


@dataclass
class InputRow:
    row: int  # position in the input, over all files in order
    source: str  # file:line (or file:row) for messages
    id: Optional[str]
    text: Optional[str]
    gold: Optional[str]
    reason: Optional[str] = None  # set when the row cannot be a query


def unit_hash(text: str) -> float:
    """A uniform number in [0, 1) from the text alone: the same on every run, process and machine (no Python hash
    randomisation). Splits, samples and serving's sticky users are all drawn with it."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def id_hash(example_id: str, seed: int | str) -> float:
    """A uniform number in [0, 1) from the id alone: the same id lands in the same split on every run."""
    return unit_hash(f"{seed}:{example_id}")


def content_id(text: str) -> str:
    """A stable id derived from the query text, for inputs that carry none."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def input_files(uri: str) -> list[str]:
    files = list_files(uri, SUFFIXES)
    if not files:
        fs, path = resolve(uri)
        if fs.get_file_info(path).type.name == "NotFound":
            raise InputError(f"input {uri}: no such file or directory")
        raise InputError(f"input {uri}: no {', '.join(SUFFIXES)} files found")
    return files


def _clean(value) -> Optional[str]:
    if value is None:
        return None
    return str(value)


def _iter_txt(path: str) -> Iterator[tuple[str, dict | None, Optional[str]]]:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the file does not start another row
    for n, raw in enumerate(lines, 1):
        raw = raw.rstrip(b"\r")
        try:
            yield f"{path}:{n}", {"text": raw.decode("utf-8")}, None
        except UnicodeDecodeError as err:
            yield f"{path}:{n}", None, f"undecodable bytes (not UTF-8 at byte {err.start})"


def _iter_jsonl(path: str, text_col: str) -> Iterator[tuple[str, dict | None, Optional[str]]]:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    checked_columns = False
    for n, raw in enumerate(lines, 1):
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield where, None, f"undecodable bytes (not UTF-8 at byte {err.start})"
            continue
        if not line.strip():
            yield where, None, "blank line"
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            yield where, None, f"invalid JSON: {err.msg}"
            continue
        if not isinstance(record, dict):
            yield where, None, f"a JSON {type(record).__name__}, not an object"
            continue
        if not checked_columns:
            # The first record decides whether the file has the text column at all: a file without it is a
            # wrong input (clear error), a later record without it is a bad row (reject).
            if text_col not in record:
                raise InputError(
                    f"{where}: no column {text_col!r} (columns: {', '.join(sorted(record))}); "
                    f"set text_column to the column that holds the queries"
                )
            checked_columns = True
        yield where, record, None


def _iter_parquet(path: str, text_col: str) -> Iterator[tuple[str, dict | None, Optional[str]]]:
    fs, p = resolve(path)
    pf = pq.ParquetFile(p, filesystem=fs)
    names = pf.schema_arrow.names
    if text_col not in names:
        raise InputError(f"{path}: no column {text_col!r} (columns: {', '.join(names)}); set text_column")
    n = 0
    for batch in pf.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield f"{path}:{n}", record, None
            n += 1


def sampled_positions(uri: str, n: int, text_column: str = "text", id_column: str = "id",
                      label_column: str = "label", seed: int = 0) -> set[int]:
    """Input positions of `n` rows spread over the whole input: those whose id hashes lowest (the same rows on
    every run and machine; a file grouped by label still gives a sample of every label). One read of the input."""
    import heapq

    # Salted apart from training's split (id_hash(id, split_seed)): the lowest split hashes are the test and
    # validation rows, so ranking by the same hash would make a sample of mostly held-out rows.
    ranked = ((id_hash(row.id, f"sample-{seed}"), row.row)
              for row in read_queries(uri, text_column, id_column, label_column))
    return {position for _, position in heapq.nsmallest(n, ranked)}


def read_queries(uri: str, text_column: str = "text", id_column: str = "id", label_column: str = "label",
                 limit: Optional[int] = None, keep: Optional[set[int]] = None) -> Iterator[InputRow]:
    """Every input row, in order, as an `InputRow`: text checked, id given or derived, duplicates flagged.
    `limit`: the first N rows; `keep`: only the rows at these positions (`sampled_positions`)."""
    seen: dict[str, str] = {}
    position = 0
    for path in input_files(uri):
        if path.endswith(".txt"):
            records = _iter_txt(path)
        elif path.endswith(".jsonl"):
            records = _iter_jsonl(path, text_column)
        else:
            records = _iter_parquet(path, text_column)
        for where, record, reason in records:
            if limit is not None and position >= limit:
                return
            row = _to_row(position, where, record, reason, text_column, id_column, label_column)
            if keep is not None and position not in keep:
                position += 1
                continue
            if row.reason is None:
                first = seen.setdefault(row.id, where)
                if first != where:
                    row.reason = f"duplicate id {row.id!r} (first seen at {first})"
            yield row
            position += 1


def _to_row(position, where, record, reason, text_column, id_column, label_column) -> InputRow:
    record = record or {}
    text = record.get(text_column)
    given_id = _clean(record.get(id_column))
    gold = _clean(record.get(label_column))
    if reason is None:
        if text_column not in record:
            reason = f"missing field {text_column!r}"
        elif text is None:
            reason = "text is null"
        elif not isinstance(text, str):
            reason = f"text is a {type(text).__name__}, not a string"
        elif not text.strip():
            reason = "empty text" if text == "" else "blank text (whitespace only)"
    if reason is None:
        text = text.strip()
        return InputRow(position, where, given_id or content_id(text), text, gold)
    # A row with no usable text still needs an id for the reject log: its given one, else its position.
    return InputRow(position, where, given_id or f"row-{position}", text if isinstance(text, str) else None,
                    gold, reason)
