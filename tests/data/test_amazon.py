"""The S3-Rec (Amazon) importer on a small fixture, its bad inputs, and the real Beauty counts."""

import json

import pyarrow.parquet as pq
import pytest

from cobra_scale.cli import main
from cobra_scale.config import load_config
from cobra_scale.data.amazon import run
from cobra_scale.data.configs import AmazonConfig
from cobra_scale.data.io import read_table
from cobra_scale.data.schemas import EXAMPLES_SCHEMA, ITEMS_SCHEMA, SEQUENCES_SCHEMA
from cobra_scale.errors import DataError
from tests.conftest import BEAUTY

ITEMS = [
    {"item_id": 1, "asin": "A1", "title": "Rose &amp; Honey Balm", "categories": [["Beauty", "Lips"]]},
    {"item_id": 2, "asin": "A2", "title": "Matte &quot;Red&quot; Lipstick", "categories": [["Beauty", "Lips"], ["Gifts"]]},
    {"item_id": 3, "asin": "A3", "title": "Night Cream", "categories": []},
    {"item_id": 4, "asin": "A4", "title": "Day Cream", "categories": [["Beauty", "Skin"]]},
]
SEQUENCES = "1 1 2 3 4\n2 4 3 2\n3 1 2\n"


def make_src(tmp_path, items=ITEMS, sequences=SEQUENCES):
    src = tmp_path / "src"
    src.mkdir()
    (src / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (src / "sequences.txt").write_text(sequences)
    return src


def test_import_fixture(tmp_path):
    src = make_src(tmp_path)
    out = tmp_path / "out"
    report = run(load_config(AmazonConfig, dotlist=[f"src={src}", f"out={out}"]))
    assert report["users"] == 3 and report["items"] == 4 and report["interactions"] == 9
    assert report["titles_html_unescaped"] == 2
    items = pq.read_table(out / "items.parquet")
    assert items.schema.equals(ITEMS_SCHEMA)
    rows = {r["item_id"]: r for r in items.to_pylist()}
    assert rows[1]["title"] == "Rose & Honey Balm"
    assert rows[2]["title"] == 'Matte "Red" Lipstick'
    assert rows[2]["categories"] == ["Beauty > Lips", "Gifts"]
    assert rows[3]["categories"] is None
    seqs = read_table(out / "sequences")
    assert seqs.schema.equals(SEQUENCES_SCHEMA)
    assert seqs.column("item_ids").to_pylist() == [[1, 2, 3, 4], [4, 3, 2], [1, 2]]
    test = read_table(out / "splits" / "loo" / "test")
    assert test.schema.equals(EXAMPLES_SCHEMA)
    assert test.column("targets").to_pylist() == [[4], [2]]  # user 3 has < 3 items
    assert report["loo_dropped_users"] == 1
    assert (out / "config.yaml").is_file() and (out / "import_report.json").is_file()


@pytest.mark.parametrize(
    "items, sequences, match",
    [
        (ITEMS, "1 1 2 x\n", "integers"),
        (ITEMS, "1 1 2 9\n", "missing from items.jsonl"),
        (ITEMS, "1 1 2\n1 3 4\n", "duplicated user"),
        (ITEMS, "1\n", "no items"),
        (ITEMS + [{"item_id": 1, "title": "again", "categories": []}], SEQUENCES, "duplicated item_id"),
        ([{"item_id": 1, "title": "", "categories": []}], "1 1\n", "no title"),
        ([{"item_id": -1, "title": "x", "categories": []}], "1 1\n", "non-negative"),
    ],
)
def test_bad_inputs(tmp_path, items, sequences, match):
    src = make_src(tmp_path, items, sequences)
    with pytest.raises(DataError, match=match):
        run(load_config(AmazonConfig, dotlist=[f"src={src}", f"out={tmp_path / 'out'}"]))


def test_cli_missing_source_is_one_line(tmp_path, capsys):
    assert main(["data", "amazon", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: source folder not found") and err.count("\n") == 1


def test_corrupt_jsonl_names_line(tmp_path):
    src = make_src(tmp_path)
    (src / "items.jsonl").write_text('{"item_id": 1, "title": "a"}\n{broken\n')
    with pytest.raises(DataError, match=r"items.jsonl:2: not valid JSON"):
        run(load_config(AmazonConfig, dotlist=[f"src={src}", f"out={tmp_path / 'out'}"]))


@pytest.mark.skipif(not (BEAUTY / "sequences.txt").is_file(), reason="shared Amazon Beauty data not present")
def test_real_beauty_counts(tmp_path):
    report = run(load_config(AmazonConfig, dotlist=[f"src={BEAUTY}", f"out={tmp_path}"]))
    assert (report["users"], report["items"], report["interactions"]) == (22_363, 12_101, 198_502)
    assert report["min_sequence_length"] == 5 and report["max_sequence_length"] == 204
    assert report["loo_users"] == 22_363
    titles = pq.read_table(tmp_path / "items.parquet", columns=["title"]).column("title").to_pylist()
    assert not any("&amp;" in t or "&quot;" in t for t in titles)


def test_undecodable_file_is_one_line_error(tmp_path):
    src = make_src(tmp_path)
    (src / "sequences.txt").write_bytes(b"1 1 2\n\xff\xfe\xfa 3\n")
    with pytest.raises(DataError, match="cannot read .*sequences.txt"):
        run(load_config(AmazonConfig, dotlist=[f"src={src}", f"out={tmp_path / 'out'}"]))
