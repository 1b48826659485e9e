"""The streaming input and the launcher config of the distributed trainer (one test runs Ray Data in-process)."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from cobra_scale.cli import main
from cobra_scale.config import load_config
from cobra_scale.data.io import read_table, write_table
from cobra_scale.errors import ConfigError
from cobra_scale.train.configs import TrainConfig
from cobra_scale.train.data import load_examples, read_sequences, training_windows
from cobra_scale.train.ray_trainer import resolve_ds_config
from cobra_scale.train.streaming import (
    catalogue_arrays,
    catalogue_from_arrays,
    count_windows,
    cut_windows,
    sample_examples,
    windows_of,
)
from cobra_scale.train.trainer import prepare
from tests.model.fixtures import tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny"))


def config(root, *extra):
    return load_config(TrainConfig, dotlist=[f"data={root}", f"ids={root / 'ids'}", f"out={root / 'run'}", "model.text_tokens=12", *extra])


@pytest.fixture(scope="module")
def catalogue(data):
    return prepare(config(data))[0]


@pytest.mark.parametrize("max_items", [2, 3, 6, 21])
def test_cut_windows_are_the_local_windows(data, catalogue, max_items):
    train = data / "splits" / "loo" / "train"
    # one unknown item id (999) is dropped, as read_sequences does
    table = read_table(train, columns=["item_ids"])
    table = pa.table({"item_ids": table.column("item_ids").to_pylist()[:-1] + [[3, 999, 4, 5]]})
    block = cut_windows(table, catalogue.item_ids, max_items)["window"]
    assert block.shape[1] == max_items and block.dtype == np.int64
    sequences = read_sequences(train, catalogue)[:-1] + [catalogue.index_of(np.array([3, 4, 5]))]
    expected = training_windows(sequences, max_items)
    assert len(block) == len(expected)
    for got, want in zip(windows_of(block), expected):
        np.testing.assert_array_equal(got, want)
    users, n = count_windows(train, max_items)
    assert users == 120 and n == len(training_windows(read_sequences(train, catalogue), max_items))


def test_read_tasks_map_function_imports_no_torch():
    """Ray Data's read workers unpickle cut_windows by module: that import must stay light."""
    code = ("import sys, pickle; from cobra_scale.train.streaming import cut_windows; blob = pickle.dumps(cut_windows); "
            "[sys.modules.pop(m) for m in list(sys.modules) if m.split('.')[0] in ('torch', 'cobra_scale')]; "
            "fn = pickle.loads(blob); print(fn.__module__, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["cobra_scale.train.windows", "False"], done.stdout + done.stderr


@pytest.mark.integration
def test_window_dataset_streams_the_local_windows_in_blocks_of_the_target_size(data, catalogue):
    from cobra_scale.distributed import init_ray
    from cobra_scale.train.streaming import window_dataset

    ray = init_ray(num_cpus=2)
    train = data / "splits" / "loo" / "train"
    expected = sorted(tuple(w) for w in training_windows(read_sequences(train, catalogue), 6))
    counts = {}
    try:
        for block_bytes in (0, 4096):  # Ray Data's default (one block here), then ~4 KB blocks
            ds = window_dataset(train, catalogue.item_ids, 6, seed=0, block_bytes=block_bytes)
            bundles = list(ds.iter_internal_ref_bundles())
            counts[block_bytes] = len(bundles)
            blocks = [block for b in bundles for block in ray.get(list(b.block_refs))]
            rows = [tuple(w) for block in blocks for w in windows_of(np.asarray(block.column("window").to_pylist()))]
            assert sorted(rows) == expected, block_bytes
    finally:
        ray.shutdown()
    assert counts[4096] > counts[0], counts


def test_sample_examples_draws_the_same_users_as_load_examples(data, catalogue, tmp_path):
    valid = data / "splits" / "loo" / "valid"
    # three files with small row groups: the sampler must cross file and group boundaries
    table = read_table(valid)
    for i, (lo, hi) in enumerate([(0, 50), (50, 51), (51, 120)]):
        write_table(table.slice(lo, hi - lo), tmp_path / f"part-{i:05d}.parquet", row_group_rows=7)
    for n in (0, 1, 33, 120, 500):
        want = load_examples(tmp_path, catalogue, 8).sample(n, seed=3)
        got = sample_examples(tmp_path, catalogue, 8, n, seed=3)
        assert torch.equal(got.history, want.history)
        np.testing.assert_array_equal(got.user_ids, want.user_ids)
        assert all(np.array_equal(a, b) for a, b in zip(got.targets, want.targets))


def test_catalogue_broadcast_round_trip(catalogue):
    arrays = catalogue_arrays(catalogue)
    for value in arrays.values():
        value.setflags(write=False)  # as they come out of Ray's object store
    back = catalogue_from_arrays(arrays)
    assert torch.equal(back.tokens, catalogue.tokens) and torch.equal(back.codes, catalogue.codes)
    assert back.codes_per_level == catalogue.codes_per_level
    np.testing.assert_array_equal(back.index_of(np.array([1, 40, 41])), [0, 39, -1])


def test_ds_config_batch_fields_follow_the_trainer(data, tmp_path):
    cfg = config(data, "launcher=ray", "batch_size=64", "distributed.workers=2", "distributed.grad_accum=4", "grad_clip=0.5")
    ds = resolve_ds_config(cfg)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is False
    for stage in (1, 3):
        assert resolve_ds_config(config(data, f"distributed.deepspeed=configs/deepspeed/zero{stage}.json"))["zero_optimization"]["stage"] == stage
    with pytest.raises(ConfigError, match="divisible"):
        resolve_ds_config(config(data, "batch_size=30", "distributed.workers=4"))
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 128, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="contradicts"):
        resolve_ds_config(config(data, "batch_size=64", f"distributed.deepspeed={bad}"))
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        resolve_ds_config(config(data, f"distributed.deepspeed={bad}"))


def test_launcher_errors_are_one_line(data, tmp_path, capsys):
    args = ["train", "--data", str(data), "--ids", str(data / "ids"), "--out", str(tmp_path / "o"), "launcher=ray"]
    assert main([*args, "distributed.deepspeed=nope.json"]) == 2
    assert capsys.readouterr().err.startswith("error: DeepSpeed config nope.json not found")
    assert main([*args, "launcher=mpi"]) == 2
    assert "launcher must be local or ray" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


class FakeShard:
    """What ``iter_train_batches`` reads of a Ray Train dataset shard: ``iter_batches`` of window rows."""

    def __init__(self, windows: np.ndarray):
        self.windows = windows

    def iter_batches(self, batch_size, **_):
        for start in range(0, len(self.windows), batch_size):
            yield {"window": self.windows[start : start + batch_size]}


def test_streamed_length_buckets_use_every_window_once_with_less_padding(catalogue):
    from cobra_scale.train.streaming import iter_train_batches

    rng = np.random.default_rng(0)
    rows = np.full((300, 8), -1, dtype=np.int64)
    for r in range(300):
        n = int(rng.integers(2, 9))
        rows[r, 8 - n :] = rng.integers(0, len(catalogue), n)
    shard = FakeShard(rows)

    def run(**kw):
        return list(iter_train_batches(shard, catalogue, 16, 0, seed=3, **kw))

    plain, bucketed = run(), run(length_buckets=True, pool_batches=8)
    assert len(plain) == len(bucketed) == 19  # ceil(300 / 16): the schedule's step count is unchanged

    def cells(batches):
        return sum(b.seq.numel() for b in batches), sorted(tuple(b.item_ids[r[r >= 0]].tolist()) for b in batches for r in b.seq)

    plain_cells, plain_windows = cells(plain)
    bucket_cells, bucket_windows = cells(bucketed)
    assert bucket_windows == plain_windows  # the same windows, each once
    assert bucket_cells < 0.8 * plain_cells  # padded to each batch's own longest window
    # resume: skipping k batches yields exactly the rest of the uninterrupted epoch
    rest = run(length_buckets=True, pool_batches=8, skip=5)
    assert [b.seq.tolist() for b in rest] == [b.seq.tolist() for b in bucketed[5:]]
