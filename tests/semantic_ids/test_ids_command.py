"""`cobra ids` end to end with the real MiniLM model on a tiny catalogue, and cold start."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cobra_scale.cli import main
from cobra_scale.data.io import write_table
from cobra_scale.data.schemas import ITEMS_SCHEMA
from cobra_scale.errors import DataError
from cobra_scale.semantic_ids.assign import Quantizer
from cobra_scale.semantic_ids.embed import load_cache, resolve_model_path

WORDS = {
    "lips": ["lipstick", "lip gloss", "lip balm", "lip liner"],
    "nails": ["nail polish", "nail file", "top coat", "cuticle oil"],
    "hair": ["shampoo", "conditioner", "hair mask", "hair spray"],
    "skin": ["face cream", "serum", "sunscreen", "cleanser"],
}


def catalogue(n_per_topic=10, start=0, title=None):
    rows = []
    item = start
    for topic, words in WORDS.items():
        for i in range(n_per_topic):
            rows.append(
                {
                    "item_id": item,
                    "title": title if title is not None else f"{words[i % 4]} {['rose', 'matte', 'daily', 'pro'][i % 4]} no.{i}",
                    "brand": None,
                    "categories": [f"Beauty > {topic}"],
                    "price": float(i),
                    "description": None,
                }
            )
            item += 1
    return pa.Table.from_pylist(rows, schema=ITEMS_SCHEMA)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ids")
    write_table(catalogue(), root / "items.parquet")
    rc = main(["ids", "--items", str(root / "items.parquet"), "--out", str(root / "rk"), "quantizer.kind=rkmeans", "quantizer.levels=2", "quantizer.codes=4"])
    assert rc == 0
    return root


def test_outputs_and_diagnostics(fitted):
    out = fitted / "rk"
    sids = pq.read_table(out / "sids.parquet")
    assert sids.column_names == ["item_id", "sid", "code_0", "code_1"]
    assert sids.num_rows == 40
    codes = np.stack([sids.column("code_0").to_numpy(), sids.column("code_1").to_numpy()], 1)
    assert codes.min() >= 0 and codes.max() < 4
    assert np.array_equal(sids.column("sid").to_numpy(), codes[:, 0] * 4 + codes[:, 1])
    diag = json.loads((out / "diagnostics.json").read_text())
    assert diag["items"] == 40 and diag["per_level"][0]["codes_used"] == 4
    assert (out / "items_per_id.png").stat().st_size > 1000
    assert (out / "quantizer" / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    # the first level separates the four topics well: most items of a topic share code_0
    topic_of = np.repeat(np.arange(4), 10)
    purity = sum(np.bincount(codes[topic_of == t, 0]).max() for t in range(4)) / 40
    assert purity >= 0.5  # chance is ~0.3


def test_cache_is_keyed_by_item_and_text(fitted):
    cached = load_cache(fitted / "rk" / "embeddings.safetensors", model_path=resolve_model_path(None))
    assert cached is not None
    ids, _, vectors = cached
    assert ids.tolist() == list(range(40)) and vectors.shape == (40, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_cold_start_assigns_new_items_without_retraining(fitted):
    new = catalogue(n_per_topic=2, start=1000)
    write_table(new, fitted / "new.parquet")
    weights_before = (fitted / "rk" / "quantizer" / "model.safetensors").read_bytes()
    rc = main(["ids", "--items", str(fitted / "new.parquet"), "--out", str(fitted / "cold"), "--quantizer-dir", str(fitted / "rk" / "quantizer")])
    assert rc == 0
    assert (fitted / "rk" / "quantizer" / "model.safetensors").read_bytes() == weights_before
    cold = pq.read_table(fitted / "cold" / "sids.parquet").to_pylist()
    assert [r["item_id"] for r in cold] == list(range(1000, 1008))
    # an item whose text equals a training item's text gets that item's ID
    quantizer, _ = Quantizer.load(fitted / "rk" / "quantizer")
    same = catalogue(n_per_topic=1)
    write_table(same, fitted / "same.parquet")
    assert main(["ids", "--items", str(fitted / "same.parquet"), "--out", str(fitted / "same"), "--quantizer-dir", str(fitted / "rk" / "quantizer")]) == 0
    got = {r["item_id"]: r["sid"] for r in pq.read_table(fitted / "same" / "sids.parquet").to_pylist()}
    train = {r["item_id"]: r["sid"] for r in pq.read_table(fitted / "rk" / "sids.parquet").to_pylist()}
    assert all(got[k] == train[10 * k] for k in got)  # item k of the 1-per-topic catalogue is item 10k of training


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    empty = catalogue(n_per_topic=2, title="").set_column(3, "categories", pa.nulls(8, pa.list_(pa.string())))
    empty = empty.set_column(4, "price", pa.nulls(8, pa.float64()))
    write_table(empty, tmp_path / "empty.parquet")
    assert main(["ids", "--items", str(tmp_path / "empty.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "no text to embed" in capsys.readouterr().err
    assert main(["ids", "--items", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "path not found" in capsys.readouterr().err
    dup = pa.concat_tables([catalogue(1), catalogue(1)])
    write_table(dup, tmp_path / "dup.parquet")
    assert main(["ids", "--items", str(tmp_path / "dup.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "duplicated item_id" in capsys.readouterr().err
    assert main(["ids", "--items", str(tmp_path / "dup.parquet"), "--out", str(tmp_path / "o"), "--quantizer-dir", str(tmp_path)]) == 2
    assert "not a saved quantiser" in capsys.readouterr().err
    assert main(["ids", "--items", "x", "--out", "y", "quantizer.kind=pq"]) == 2
    assert "quantizer.kind" in capsys.readouterr().err


def test_missing_items_file_error_class():
    from cobra_scale.semantic_ids.assign import load_items

    with pytest.raises(DataError):
        load_items("/nonexistent/items.parquet")


def test_cache_reuse_and_changed_text(fitted, tmp_path):
    import shutil

    from cobra_scale.semantic_ids.configs import EmbedConfig
    from cobra_scale.semantic_ids.embed import embed_items

    cache = tmp_path / "cache.safetensors"
    shutil.copy(fitted / "rk" / "embeddings.safetensors", cache)
    items = catalogue()
    ids, vectors, n = embed_items(items, EmbedConfig(), cache)
    assert n == 0 and len(ids) == 40
    titles = items.column("title").to_pylist()
    titles[7] = "a completely different garden hose"
    changed = items.set_column(1, "title", pa.array(titles))
    _, vectors2, n2 = embed_items(changed, EmbedConfig(), cache)
    assert n2 == 1
    np.testing.assert_array_equal(np.delete(vectors2, 7, 0), np.delete(vectors, 7, 0))
    assert float(vectors2[7] @ vectors[7]) < 0.9
    # another max_length is another embedding: the cache is not reused
    _, _, n3 = embed_items(changed, EmbedConfig(max_length=16), cache)
    assert n3 == 40
