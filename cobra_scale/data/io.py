"""Parquet I/O helpers shared by the data layer: file discovery, safe open, shard naming.

Every failure a user can cause (missing path, unreadable file) becomes a one-line
:class:`~cobra_scale.errors.DataError` naming the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from cobra_scale.errors import DataError

_HIVE_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``part-00003.parquet``."""
    return f"part-{index:05d}.parquet"


def list_parquet_files(path: str | os.PathLike) -> list[Path]:
    """All ``*.parquet`` files under ``path`` (a file or a folder), sorted by path.

    Hidden files and ``_``-prefixed files (``_SUCCESS``, ``_metadata``) are skipped.

    Raises:
        DataError: the path does not exist or holds no Parquet file.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"path not found: {p}")
    if p.is_file():
        return [p]
    files = sorted(
        f for f in p.rglob("*.parquet") if f.is_file() and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)
    )
    if not files:
        raise DataError(f"no .parquet files under {p}")
    return files


def hive_partitions(file: Path, root: Path) -> dict[str, str]:
    """``{"day": "2026-01-03"}`` from a path like ``root/day=2026-01-03/part-00000.parquet``."""
    out = {}
    for part in file.relative_to(root).parts[:-1]:
        m = _HIVE_PART.match(part)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def open_parquet(file: str | os.PathLike) -> pq.ParquetFile:
    """Open a Parquet file, turning any read failure into a one-line DataError."""
    try:
        return pq.ParquetFile(file)
    except (OSError, pa.ArrowException) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read Parquet file {file}: {msg}") from exc


def iter_batches(file: str | os.PathLike, columns: list[str] | None = None, batch_rows: int = 1_000_000) -> Iterator[pa.RecordBatch]:
    """Stream record batches of ``file`` (bounded memory); read errors become DataError."""
    pf = open_parquet(file)
    try:
        yield from pf.iter_batches(batch_size=batch_rows, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read Parquet file {file}: {msg}") from exc


def read_table(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Read every Parquet file under ``path`` into one table (for small tables: items, splits)."""
    tables = []
    for f in list_parquet_files(path):
        try:
            tables.append(pq.read_table(f, columns=columns))
        except (OSError, pa.ArrowException) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"cannot read Parquet file {f}: {msg}") from exc
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def write_table(table: pa.Table, file: str | os.PathLike, row_group_rows: int = 128_000) -> Path:
    """Write ``table`` atomically (temp file + rename) with zstd compression."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_rows)
    os.replace(tmp, file)
    return file
