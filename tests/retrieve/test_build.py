"""``cobra index`` from a run and from exported vectors; opening a run on its index."""

import json

import numpy as np
import pytest
import torch

from cobra_scale.cli import main
from cobra_scale.retrieve.build import load_recommender
from cobra_scale.retrieve.faiss_index import IdIvfIndex
from cobra_scale.retrieve.recommender import InferenceParams
from cobra_scale.train.trainer import load_run, make_recommender
from tests.retrieve.fixtures import tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("idx"))


@pytest.mark.slow
def test_index_command_from_run_and_recommender_on_it(run, tmp_path, capsys):
    out = tmp_path / "index"
    assert main(["index", "--run", str(run), "--out", str(out), "--shards", "2"]) == 0
    meta = json.loads((out / "index.json").read_text())
    assert meta["items"] == 40 and len(meta["shards"]) == 2 and meta["source"] == {"run": str(run)}
    assert (out / "config.yaml").is_file() and (out / "items.safetensors").is_file()
    # a second build refuses to overwrite, in one line
    assert main(["index", "--run", str(run), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    model, catalogue, cfg, device = load_run(run)
    exact = make_recommender(model, catalogue, device)
    indexed, cat2, _, _ = load_recommender(run, out)
    assert np.array_equal(cat2.item_ids, catalogue.item_ids) and torch.equal(cat2.codes, catalogue.codes)
    assert torch.equal(indexed.sids, exact.sids)
    hist = torch.tensor([[-1, -1, 3, 4, 5], [0, 1, 2, 3, 4], [-1, 10, 11, 12, 13]])
    for mode in ("cobra", "no_fusion"):
        p = InferenceParams(mode=mode, beams=8)
        a, b = exact.recommend(hist, 10, p), indexed.recommend(hist, 10, p)
        torch.testing.assert_close(b[1], a[1], atol=1e-5, rtol=1e-4)
        assert torch.equal(a[0][torch.isfinite(a[1])], b[0][torch.isfinite(b[1])])


@pytest.mark.slow
def test_index_command_from_exported_vectors(run, tmp_path):
    from safetensors.numpy import save_file

    from cobra_scale.config import load_config
    from cobra_scale.train.configs import TrainConfig

    cfg = load_config(TrainConfig, run / "config.yaml")
    rng = np.random.default_rng(0)
    ids = np.arange(40, 0, -1)  # item ids 1..40, unsorted on purpose
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    save_file({"item_ids": ids, "vectors": vectors}, str(tmp_path / "vec.safetensors"))
    out = tmp_path / "index"
    assert main(["index", "--vectors", str(tmp_path / "vec.safetensors"), "--sids", f"{cfg.ids}/sids.parquet", "--out", str(out), "--kind", "flat"]) == 0
    index = IdIvfIndex.load(out)
    # item 0 of the index is item id 1, i.e. row 39 of the file
    got = index.search(torch.from_numpy(vectors[39:40]), 1)
    assert got[0].item() == 0 and got[1].item() == pytest.approx(1.0, abs=1e-5)
    save_file({"item_ids": np.array([999]), "vectors": vectors[:1]}, str(tmp_path / "bad.safetensors"))
    assert main(["index", "--vectors", str(tmp_path / "bad.safetensors"), "--sids", f"{cfg.ids}/sids.parquet", "--out", str(tmp_path / "o")]) == 2


def test_index_config_errors_are_one_line(tmp_path, capsys):
    assert main(["index", "--out", str(tmp_path)]) == 2
    assert "exactly one source" in capsys.readouterr().err
    assert main(["index", "--run", str(tmp_path), "--out", str(tmp_path / "o"), "--kind", "hnsw"]) == 2
    assert "kind" in capsys.readouterr().err
    assert main(["index", "--run", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "best/model.safetensors" in capsys.readouterr().err
