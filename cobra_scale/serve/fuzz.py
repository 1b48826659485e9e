"""Malformed ``POST /recommend`` requests derived from the service's OpenAPI schema.

Every case must be answered with a 4xx. The generator reads the request schema the
server publishes (types, bounds, patterns, enums, array lengths) and breaks it field by
field, then adds structural breakage (bad JSON, wrong top-level types, unknown fields,
oversized or deeply nested bodies, wrong content types, non-UTF-8 bytes) and semantic
breakage the schema cannot show (unknown item/user ids, unavailable modes). Used by the
tests and by ``tools/load_test.py``; no dependency beyond the standard library.

Example::

    cases = malformed_requests(openapi, valid={"items": [3, 4], "k": 5}, seed=0)
    label, body, headers = next(cases)
"""

from __future__ import annotations

import json
import random
from typing import Any, Iterator

JSON = {"content-type": "application/json"}
HUGE = 10**30


def request_schema(openapi: dict, path: str = "/recommend") -> dict:
    """The JSON schema of ``path``'s POST body, ``$ref`` resolved."""
    body = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return _resolve(openapi, body)


def _resolve(openapi: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    if ref:
        node: Any = openapi
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        return node
    return schema


def _variants(prop: dict) -> tuple[dict, bool]:
    """The non-null schema of a property and whether null is allowed."""
    options = prop.get("anyOf") or prop.get("oneOf")
    if not options:
        return prop, False
    non_null = [o for o in options if o.get("type") != "null"]
    return (non_null[0] if non_null else {}), len(non_null) < len(options)


def bad_values(prop: dict, rng: random.Random) -> list[tuple[str, Any]]:
    """Values that break one property's schema: wrong types, out-of-range, bad elements."""
    schema, nullable = _variants(prop)
    kind = schema.get("type")
    out: list[tuple[str, Any]] = []
    if not nullable:
        out.append(("null", None))
    others = {"string": "7", "boolean": True, "float": 2.5, "array": [1], "object": {"a": 1}, "integer": 3}
    accepted = {"integer": {"integer"}, "number": {"integer", "float"}, "string": {"string"}, "boolean": {"boolean"}, "array": {"array"}}.get(kind, set())
    out += [(f"type {name}", value) for name, value in others.items() if name not in accepted]
    if kind in ("integer", "number"):
        lo = schema.get("minimum", schema.get("exclusiveMinimum"))
        hi = schema.get("maximum", schema.get("exclusiveMaximum"))
        if "exclusiveMinimum" in schema:
            out.append(("at exclusive minimum", schema["exclusiveMinimum"]))
        if lo is not None:
            out.append(("below minimum", lo - (1 if kind == "integer" else 0.5)))
        if hi is not None:
            out.append(("above maximum", hi + (1 if kind == "integer" else 0.5)))
        out += [("huge", HUGE), ("huge negative", -HUGE)]
        if kind == "number":
            out += [("nan", float("nan")), ("infinity", float("inf")), ("-infinity", float("-inf"))]
    elif kind == "string":
        if "enum" in schema or "const" in schema:
            out.append(("not in enum", "not_a_mode"))
        if "pattern" in schema:
            out += [("pattern: slash", "../etc/passwd"), ("pattern: space", "a b"), ("pattern: empty", ""), ("pattern: long", "x" * 200)]
        out.append(("string control chars", "\x00\x1b[31m"))
    elif kind == "array":
        items, _ = _variants(schema.get("items", {}))
        if schema.get("minItems", 0) > 0:
            out.append(("empty array", []))
        if "maxItems" in schema:
            out.append(("too many items", [1] * (schema["maxItems"] + 1)))
        for label, value in bad_values(items, rng)[:6]:
            if value is not None:
                out.append((f"element {label}", [1, value]))
        out.append(("nested array", [[1, 2]]))
    return out


def malformed_requests(openapi: dict, valid: dict, seed: int = 0, max_body_bytes: int = 65536, unknown_items: list[int] | None = None) -> Iterator[tuple[str, bytes, dict]]:
    """Endless stream of ``(label, body, headers)`` that must each be refused with a 4xx.

    ``valid`` is one good request (mutated field by field); ``unknown_items`` are ids
    known to be absent from the catalogue (default: ids near the int64 limits).
    """
    rng = random.Random(seed)
    schema = request_schema(openapi)
    props = schema.get("properties", {})
    unknown = unknown_items or [2**63 - 1, -(2**63), 2**62 + 12345]

    def encode(obj: Any) -> bytes:
        return json.dumps(obj).encode()  # NaN/Infinity become the non-standard tokens on purpose

    field_cases = [(f"{name}: {label}", name, value) for name, prop in props.items() for label, value in bad_values(prop, rng)]
    structural: list[tuple[str, bytes, dict]] = [
        ("neither items nor user_id", encode({k: v for k, v in valid.items() if k not in ("items", "user_id")}), JSON),
        ("both items and user_id", encode({**valid, "items": [1], "user_id": 1}), JSON),
        ("unknown field", encode({**valid, "admin": True}), JSON),
        ("body is a list", encode([valid]), JSON),
        ("body is a string", encode("items"), JSON),
        ("body is a number", b"42", JSON),
        ("body is null", b"null", JSON),
        ("empty body", b"", JSON),
        ("truncated json", encode(valid)[:-3], JSON),
        ("not json", b"items=1&k=2", JSON),
        ("non-utf8 bytes", b'{"items": [1], "k": "\xff\xfe"}', JSON),
        ("deeply nested", b"[" * 5000 + b"]" * 5000, JSON),
        ("deeply nested field", b'{"items": ' + b"[" * 3000 + b"]" * 3000 + b"}", JSON),
        ("oversized body", b'{"items": [' + b"1," * (max_body_bytes // 2 + 8) + b'1], "k": 1}', JSON),
        ("form content type", encode(valid), {"content-type": "application/x-www-form-urlencoded"}),
        ("text content type", encode(valid), {"content-type": "text/plain"}),
        ("bad content length", encode(valid), {**JSON, "content-length": "abc"}),
        ("unknown item ids", encode({**_without(valid, "user_id"), "items": unknown[:2]}), JSON),
        ("one unknown item id", encode({**_without(valid, "user_id"), "items": [*(valid.get("items") or [])[:2], unknown[0]]}), JSON),
        ("unknown user id", encode({**_without(valid, "items"), "user_id": -(2**63) + 7}), JSON),
        ("unknown model slot", encode({**valid, "model": "no_such_model"}), JSON),
    ]
    while True:
        roll = rng.random()
        if roll < 0.3:
            yield structural[rng.randrange(len(structural))]
        elif roll < 0.8:
            label, name, value = field_cases[rng.randrange(len(field_cases))]
            yield label, encode({**valid, name: value}), JSON
        else:  # several fields broken at once
            picks = rng.sample(field_cases, k=min(3, len(field_cases)))
            body = dict(valid)
            for _, name, value in picks:
                body[name] = value
            yield " + ".join(p[0] for p in picks), encode(body), JSON


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


__all__ = ["bad_values", "malformed_requests", "request_schema"]
