"""The data layer: formats, importers, the synthetic log generator, sessionisation, splits.

Formats (pyarrow schemas in :mod:`cobra_scale.data.schemas`, documented in docs/data.md):

* events     one row per interaction, Parquet partitioned by ``day=YYYY-MM-DD``
* items      the catalogue with text fields; :func:`item_text` flattens them
* sequences  one row per user, time-ordered ``item_ids`` + ``timestamps``, sharded
* examples   evaluation rows: ``history`` (last N items) -> ``targets``
"""
