"""Schemas and the item text builder."""

import pyarrow as pa

from cobra_scale.data.schemas import (
    EVENTS_SCHEMA,
    EXAMPLES_SCHEMA,
    ITEMS_SCHEMA,
    SEQUENCES_SCHEMA,
    day_of,
    day_start,
    item_text,
    item_texts,
)


def test_schema_columns():
    assert EVENTS_SCHEMA.names == ["user_id", "item_id", "ts", "event_type", "value"]
    assert ITEMS_SCHEMA.names == ["item_id", "title", "brand", "categories", "price", "description"]
    assert SEQUENCES_SCHEMA.field("item_ids").type == pa.list_(pa.int64())
    assert EXAMPLES_SCHEMA.field("targets").type == pa.list_(pa.int64())
    assert not EVENTS_SCHEMA.field("user_id").nullable and EVENTS_SCHEMA.field("value").nullable


def test_item_text_full_and_sparse():
    full = item_text(
        {"title": "Rose &amp; Honey Lip Balm", "brand": "Acme", "categories": ["Beauty > Lips", "Gifts"], "price": 4.5, "description": "Soft."}
    )
    assert full == "Rose & Honey Lip Balm. Brand: Acme. Category: Beauty > Lips; Gifts. Price: 4.50. Soft."
    assert item_text({"title": "Only a title", "brand": None, "categories": None, "price": float("nan")}) == "Only a title."


def test_item_texts_table():
    table = pa.table(
        {"item_id": [1, 2], "title": ["A", "B"], "brand": [None, "X"], "categories": [None, ["C"]], "price": [None, 1.0], "description": [None, None]},
        schema=ITEMS_SCHEMA,
    )
    assert item_texts(table) == ["A.", "B. Brand: X. Category: C. Price: 1.00."]


def test_days_round_trip():
    start = day_start("2026-01-03")
    assert day_of(start) == "2026-01-03"
    assert day_of(start + 86_399) == "2026-01-03"
    assert day_of(start + 86_400) == "2026-01-04"
