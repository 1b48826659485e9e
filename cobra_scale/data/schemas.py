"""Pyarrow schemas of every table the data layer reads or writes, and the item text builder.

Ids are non-negative int64. Timestamps are int64 Unix seconds (UTC). Columns marked
nullable may be null where unknown (e.g. Amazon Beauty has no brand or price).
"""

from __future__ import annotations

import datetime as dt
import html
from typing import Any, Mapping

import pyarrow as pa

# Event types the generator writes and the sessioniser understands. Other strings are
# kept as-is in events; sequences include the types listed in the sessionise config.
EVENT_TYPES = ("click", "conversion")

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),  # Unix seconds, UTC
        pa.field("event_type", pa.string(), nullable=False),  # "click" | "conversion" | ...
        pa.field("value", pa.float32(), nullable=True),  # revenue of a conversion, else null
    ],
    metadata={"cobra_scale.table": "events", "partitioning": "hive: day=YYYY-MM-DD"},
)

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("brand", pa.string(), nullable=True),
        pa.field("categories", pa.list_(pa.string()), nullable=True),  # paths "A > B > C"
        pa.field("price", pa.float64(), nullable=True),
        pa.field("description", pa.string(), nullable=True),
    ],
    metadata={"cobra_scale.table": "items"},
)

SEQUENCES_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_ids", pa.list_(pa.int64()), nullable=False),  # oldest first
        pa.field("timestamps", pa.list_(pa.int64()), nullable=True),  # null if unknown (Amazon)
    ],
    metadata={"cobra_scale.table": "sequences"},
)

# One evaluation (or training-example) row: the model reads `history` and must
# retrieve `targets` (leave-one-out: exactly one target; time split: the items the
# user interacted with on the test day, first occurrence order).
EXAMPLES_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("history", pa.list_(pa.int64()), nullable=False),  # last N items, oldest first
        pa.field("history_ts", pa.list_(pa.int64()), nullable=True),
        pa.field("targets", pa.list_(pa.int64()), nullable=False),
    ],
    metadata={"cobra_scale.table": "examples"},
)

SCHEMAS: dict[str, pa.Schema] = {
    "events": EVENTS_SCHEMA,
    "items": ITEMS_SCHEMA,
    "sequences": SEQUENCES_SCHEMA,
    "examples": EXAMPLES_SCHEMA,
}

SECONDS_PER_DAY = 86_400


def day_of(ts: int) -> str:
    """The ``YYYY-MM-DD`` (UTC) partition value of a Unix-seconds timestamp."""
    return dt.datetime.fromtimestamp(int(ts), tz=dt.timezone.utc).strftime("%Y-%m-%d")


def day_start(day: str) -> int:
    """Unix seconds of 00:00 UTC on ``day`` (``YYYY-MM-DD``)."""
    d = dt.date.fromisoformat(day)
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone.utc).timestamp())


def item_text(item: Mapping[str, Any]) -> str:
    """Flatten an item's fields into the one text the encoders read.

    Fields that are null/empty are skipped, so a sparse catalogue (Amazon: title and
    categories only) and a rich one share one format::

        >>> item_text({"title": "Rose Lip Balm", "brand": "Acme", "categories": ["Beauty > Lips"],
        ...            "price": 4.5, "description": None})
        'Rose Lip Balm. Brand: Acme. Category: Beauty > Lips. Price: 4.50.'
    """
    parts: list[str] = []
    title = item.get("title")
    if title:
        parts.append(html.unescape(str(title)).strip().rstrip(".") + ".")
    brand = item.get("brand")
    if brand:
        parts.append(f"Brand: {str(brand).strip().rstrip('.')}.")
    cats = item.get("categories")
    if cats is not None and len(cats) > 0:
        parts.append("Category: " + "; ".join(str(c) for c in cats) + ".")
    price = item.get("price")
    if price is not None and price == price:  # skip NaN
        parts.append(f"Price: {float(price):.2f}.")
    desc = item.get("description")
    if desc:
        parts.append(str(desc).strip())
    return " ".join(parts)


def item_texts(table: pa.Table) -> list[str]:
    """:func:`item_text` for every row of an items table, in row order."""
    cols = {name: table.column(name).to_pylist() for name in ITEMS_SCHEMA.names if name in table.column_names}
    n = table.num_rows
    return [item_text({k: v[i] for k, v in cols.items()}) for i in range(n)]
