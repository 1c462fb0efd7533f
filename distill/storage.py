"""Paths that may be local or any pyarrow filesystem URI (s3://, gs://, hdfs://), and atomic Parquet shards.

Every output file appears whole or not at all: local shards are written under a temporary name and renamed;
object stores (S3, GCS) only make an object visible once its upload completes. That is what lets a killed run be
rerun into the same directory: a row is done exactly when it sits in a complete shard.

Folders (a model, an adapter) move between local disk and the store with pyarrow.fs.copy_files: `staged_dir`
publishes one that was filled locally, `local_dir` hands a stored one to libraries that only read local files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from typing import Any, Iterable, Iterator, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, suffixes: Iterable[str] = (".parquet",)) -> list[str]:
    """Files under `uri` (recursively) with one of `suffixes`, sorted; hidden and `_`-prefixed names skipped.
    Returns URIs/paths in the same form as `uri`."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [uri]
    suffixes = tuple(suffixes)
    out = []
    for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        rel = f.path[len(path.rstrip("/")) + 1:]
        if f.type != pafs.FileType.File or any(p.startswith((".", "_")) for p in rel.split("/")):
            continue
        if f.path.endswith(suffixes):
            out.append(join(uri, rel))
    return sorted(out)


def read_columns(uri: str, columns: list[str]) -> pa.Table:
    """The given columns of every Parquet shard under `uri` (an empty table when there is none)."""
    files = list_files(uri)
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    tables = []
    for f in files:
        fs, path = resolve(f)
        tables.append(pq.read_table(path, filesystem=fs, columns=columns))
    return pa.concat_tables(tables, promote_options="permissive")


def read_ids(uri: str) -> set[str]:
    return set(read_columns(uri, ["id"]).column("id").to_pylist())


def write_text(uri: str, text: str) -> None:
    """The whole file at once (a local one under a temporary name, renamed into place)."""
    fs, path = resolve(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(text.encode())
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(text.encode())


def read_text(uri: str) -> Optional[str]:
    """The file's text, or None when there is no such file."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(uri: str) -> Optional[Any]:
    text = read_text(uri)
    return None if text is None else json.loads(text)


def _write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    if is_local(fs):
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs)


def write_table(uri: str, table: pa.Table) -> None:
    """One Parquet file, whole or not at all."""
    fs, path = resolve(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    _write_parquet(fs, path, table)


@contextlib.contextmanager
def staged_dir(uri: str) -> Iterator[str]:
    """A local folder for the caller to fill, which then replaces the folder `uri`.

    Local: filled beside the target under a hidden name and renamed into place, so the target is whole or absent.
    Object store (no rename): filled in a temporary folder; then the old objects are deleted and the new ones
    uploaded (pyarrow.fs.copy_files). Readers there tell a finished folder by a marker the caller writes after it
    (e.g. train_summary.json). On an exception the target is left as it was."""
    fs, path = resolve(uri)
    if is_local(fs):
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
        return
    tmp = tempfile.mkdtemp(prefix="distill-upload-")
    try:
        yield tmp
        remove(uri)
        upload_dir(tmp, uri)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upload_dir(local: str, uri: str) -> None:
    """Copy the files of a local folder into the folder `uri` (created if needed; other files there stay)."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@contextlib.contextmanager
def local_dir(uri: str) -> Iterator[str]:
    """The folder `uri` as a local folder, for libraries that only read local files (peft, vLLM): the folder
    itself when it is local, else a temporary download (pyarrow.fs.copy_files) removed afterwards."""
    fs, path = resolve(uri)
    if is_local(fs):
        yield path
        return
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such folder")
    tmp = tempfile.mkdtemp(prefix="distill-download-")
    try:
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


class ShardWriter:
    """Buffers rows and writes them as atomic Parquet shards of at most `rows_per_shard` rows, and at the latest
    `flush_seconds` after the oldest buffered row arrived — also when no further row comes (a timer thread), so
    a long run persists its progress within a bounded delay and a kill loses at most that much."""

    def __init__(self, uri: str, prefix: str, schema: pa.Schema, rows_per_shard: int = 1000,
                 flush_seconds: float = 60.0):
        import threading

        self.uri, self.prefix, self.schema = uri, prefix, schema
        self.rows_per_shard, self.flush_seconds = rows_per_shard, flush_seconds
        self.fs, self.path = resolve(uri)
        self.fs.create_dir(self.path, recursive=True)
        self.run = uuid.uuid4().hex[:8]
        self.seq = 0
        self.rows_written = 0
        self._buffer: list[dict] = []
        self._since: Optional[float] = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._error: Optional[BaseException] = None
        self._timer = threading.Thread(target=self._flush_when_due, daemon=True)
        self._timer.start()

    def _flush_when_due(self) -> None:
        while not self._closed.wait(min(1.0, self.flush_seconds / 4)):
            with self._lock:
                if self._buffer and time.monotonic() - self._since >= self.flush_seconds:
                    try:
                        self._flush()
                    except BaseException as err:  # re-raised by the next write or close, in the caller's thread
                        self._error = err
                        return

    def write(self, row: dict) -> None:
        with self._lock:
            if self._error is not None:
                raise self._error
            if not self._buffer:
                self._since = time.monotonic()
            self._buffer.append(row)
            if len(self._buffer) >= self.rows_per_shard or time.monotonic() - self._since >= self.flush_seconds:
                self._flush()

    def flush(self) -> None:
        with self._lock:
            if self._error is not None:
                raise self._error
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        _write_parquet(self.fs, f"{self.path}/{self.prefix}-{self.run}-{self.seq:05d}.parquet", table)
        self.seq += 1
        self.rows_written += len(self._buffer)
        self._buffer = []

    def close(self) -> None:
        self._closed.set()
        self._timer.join()
        self.flush()

    def discard(self) -> None:
        """Stop without writing what is buffered (the run failed; a rerun redoes those rows)."""
        self._closed.set()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        # On an exception the buffered rows are dropped on purpose: a rerun redoes them; writing a shard
        # from a half-failed state is how rows get lost or duplicated.
        if exc[0] is None:
            self.close()
        else:
            self.discard()


def clean_temporaries(uri: str) -> None:
    """Remove the temporary files a killed writer left behind (local filesystems only)."""
    fs, path = resolve(uri)
    if not is_local(fs) or not os.path.isdir(path):
        return
    for name in os.listdir(path):
        if name.startswith(".") and name.endswith(".tmp"):
            os.remove(os.path.join(path, name))
