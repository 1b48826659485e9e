"""``cobra data synth``: formats, determinism, shard independence and the statistics that make
the synthetic logs realistic (power-law popularity, topic-bearing text) and learnable."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cobra_scale.cli import main
from cobra_scale.data import synth
from cobra_scale.data.configs import SynthConfig
from cobra_scale.data.schemas import EVENTS_SCHEMA, ITEMS_SCHEMA, SECONDS_PER_DAY, day_of, day_start
from cobra_scale.errors import ConfigError

SMALL = dict(users=2000, items=300, days=3, shards=2, workers=1, seed=7, chunk_users=700)


def _files(root: Path) -> dict[str, Path]:
    """Relative path -> file for every visible Parquet file under ``root``."""
    return {str(f.relative_to(root)): f for f in sorted(root.rglob("*.parquet"))}


def _events(root: Path) -> pa.Table:
    """All events, days in order, each file's rows in file order, with the ``day`` partition value."""
    tables = []
    for rel, f in _files(root / "events").items():
        t = pq.read_table(f)
        tables.append(t.append_column("day", pa.array([rel.split("/")[0].removeprefix("day=")] * t.num_rows)))
    return pa.concat_tables(tables)


@pytest.fixture(scope="module")
def synth_cfg(tmp_path_factory) -> SynthConfig:
    return SynthConfig(out=str(tmp_path_factory.mktemp("synth") / "a"), **SMALL)


@pytest.fixture(scope="module")
def synth_out(synth_cfg) -> Path:
    summary = synth.run(synth_cfg)
    assert summary["users"] == synth_cfg.users and summary["files"] > 0
    return Path(synth_cfg.out)


@pytest.fixture(scope="module")
def synth_events(synth_out) -> dict[str, np.ndarray]:
    t = _events(synth_out)
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}


@pytest.fixture(scope="module")
def synth_clicks(synth_events) -> dict[str, np.ndarray]:
    """Clicks sorted by (user, ts), ties in file order (= generation order)."""
    e = synth_events
    keep = np.flatnonzero(e["event_type"] == "click")
    o = keep[np.lexsort((keep, e["ts"][keep], e["user_id"][keep]))]
    return {k: v[o] for k, v in e.items()}


def _same_tables(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    for rel in fa:
        assert pq.read_table(fa[rel]).equals(pq.read_table(fb[rel])), rel


# ---------------------------------------------------------------------------- formats


def test_output_layout_and_schemas(synth_out, synth_cfg):
    items = pq.read_table(synth_out / "items.parquet")
    assert items.schema.equals(ITEMS_SCHEMA)
    assert items.column("item_id").to_pylist() == list(range(synth_cfg.items))
    files = _files(synth_out / "events")
    assert files and all(pq.read_schema(f).equals(EVENTS_SCHEMA) for f in files.values())
    # one file per (shard, day): part-00000 and part-00001 on every one of the 3 days
    assert sorted(files) == sorted(
        f"day={day_of(day_start(synth_cfg.start_date) + d * SECONDS_PER_DAY)}/part-{s:05d}.parquet" for d in range(3) for s in range(2)
    )
    assert not [p for p in (synth_out / "events").rglob("*") if p.name.startswith(".")]  # no temp files left
    truth = pq.read_table(synth_out / "truth" / "items_truth.parquet")
    assert truth.column_names[:3] == ["item_id", "topic", "popularity"] and truth.num_rows == synth_cfg.items
    assert abs(sum(truth.column("popularity").to_pylist()) - 1) < 1e-9
    assert (synth_out / "config.yaml").is_file()
    stats = json.loads((synth_out / "synth_stats.json").read_text())
    assert stats["events"] == stats["clicks"] + stats["conversions"] > 0


def test_item_fields(synth_out):
    items = pq.read_table(synth_out / "items.parquet").to_pylist()
    share = lambda key: np.mean([it[key] is not None for it in items])  # noqa: E731
    assert 0.55 < share("description") < 0.85
    assert share("brand") > 0.8 and share("price") > 0.8
    assert all(it["title"] and len(it["categories"]) == 1 and it["categories"][0].count(" > ") == 2 for it in items)
    assert all(p > 0 for it in items if (p := it["price"]) is not None)


def test_events_consistent(synth_events, synth_cfg):
    e = synth_events
    t0 = day_start(synth_cfg.start_date)
    assert e["ts"].min() >= t0 and e["ts"].max() < t0 + synth_cfg.days * SECONDS_PER_DAY
    assert all(day_of(ts) == d for ts, d in zip(e["ts"][::97], e["day"][::97]))  # partition matches ts
    assert set(np.unique(e["user_id"])) == set(range(synth_cfg.users))  # every user has >= 1 click
    assert e["item_id"].min() >= 0 and e["item_id"].max() < synth_cfg.items
    is_conv = e["event_type"] == "conversion"
    assert set(np.unique(e["event_type"])) == {"click", "conversion"}
    assert 0 < is_conv.sum() < 0.2 * (~is_conv).sum()  # conversions are much rarer than clicks
    assert np.isnan(e["value"][~is_conv]).all() and (e["value"][is_conv] > 0).all()
    # Every conversion follows a click of the same user and item at an earlier-or-equal ts.
    first_click = {}
    for u, i, ts in zip(e["user_id"][~is_conv], e["item_id"][~is_conv], e["ts"][~is_conv]):
        first_click[(u, i)] = min(ts, first_click.get((u, i), ts))
    assert all((u, i) in first_click and first_click[(u, i)] <= ts for u, i, ts in zip(e["user_id"][is_conv], e["item_id"][is_conv], e["ts"][is_conv]))
    # Read in day order and file order, each user's timestamps never decrease.
    o = np.argsort(e["user_id"], kind="stable")
    u, ts = e["user_id"][o], e["ts"][o]
    assert (np.diff(ts)[np.diff(u) == 0] >= 0).all()


def test_heavy_tailed_activity(synth_clicks, synth_cfg):
    per_user = np.bincount(synth_clicks["user_id"])
    assert abs(per_user.mean() - synth_cfg.mean_events) < 0.15 * synth_cfg.mean_events
    assert (per_user >= 3).mean() > 0.75
    assert per_user.max() > 5 * synth_cfg.mean_events  # a heavy tail of very active users


# ---------------------------------------------------------------------------- determinism


def test_deterministic_across_workers_and_reruns(synth_out, synth_cfg, tmp_path):
    again = dataclasses.replace(synth_cfg, out=str(tmp_path / "b"), workers=2)
    synth.run(again)
    _same_tables(synth_out, tmp_path / "b")
    other = dataclasses.replace(synth_cfg, out=str(tmp_path / "c"), seed=synth_cfg.seed + 1)
    synth.run(other)
    a, c = _events(synth_out), _events(tmp_path / "c")
    assert a.num_rows != c.num_rows or not a.equals(c)
    assert not pq.read_table(synth_out / "items.parquet").equals(pq.read_table(tmp_path / "c" / "items.parquet"))


def test_shards_are_independent(synth_out, synth_cfg, tmp_path):
    # Regenerating shard 1 alone (no shard 0 run before it) gives the same files.
    cat = synth.build_catalog(synth_cfg)
    lo, hi = synth_cfg.users // 2, synth_cfg.users
    stats = synth.generate_shard(cat, synth_cfg, 1, lo, hi, str(tmp_path))
    mine = {k: v for k, v in _files(synth_out / "events").items() if k.endswith("part-00001.parquet")}
    assert stats["files"] == len(mine) and _files(tmp_path / "events").keys() == mine.keys()
    for rel, f in _files(tmp_path / "events").items():
        t = pq.read_table(f)
        assert t.equals(pq.read_table(mine[rel]))
        assert pa.compute.min(t.column("user_id")).as_py() >= lo


# ---------------------------------------------------------------------------- statistics


def test_popularity_is_power_law(synth_clicks, synth_cfg):
    counts = np.sort(np.bincount(synth_clicks["item_id"], minlength=synth_cfg.items))[::-1]
    top = counts[: synth_cfg.items // 10].sum() / counts.sum()
    assert top > 0.4, top
    ranks = np.arange(1, 101)
    slope = np.polyfit(np.log(ranks), np.log(np.maximum(counts[:100], 1)), 1)[0]
    assert -2.5 < slope < -0.4, slope


def test_title_words_carry_topic(synth_out):
    items = pq.read_table(synth_out / "items.parquet").column("title").to_pylist()
    topic = pq.read_table(synth_out / "truth" / "items_truth.parquet").column("topic").to_numpy()
    words = [set(t.lower().split()) for t in items]
    vocab = {w: j for j, w in enumerate(sorted(set().union(*words)))}
    x = np.zeros((len(words), len(vocab)))
    for i, ws in enumerate(words):
        x[i, [vocab[w] for w in ws]] = 1
    overlap = x @ x.T
    np.fill_diagonal(overlap, -1)
    same = topic[:, None] == topic[None, :]
    off = ~np.eye(len(topic), dtype=bool)
    # Same-topic pairs share far more words than cross-topic pairs ...
    assert overlap[same & off].mean() > 5 * overlap[~same].mean()
    # ... so a 1-nearest-neighbour (by shared words) classifier recovers the topic.
    acc = (topic[overlap.argmax(1)] == topic).mean()
    chance = np.bincount(topic).max() / len(topic)
    assert acc > 0.8 and acc > 3 * chance, (acc, chance)


def test_next_item_is_learnable(synth_clicks):
    # Hold out each user's last click; train on every earlier transition.
    u, item = synth_clicks["user_id"], synth_clicks["item_id"]
    last = np.r_[u[1:] != u[:-1], True]
    first = np.r_[True, u[1:] != u[:-1]]
    eval_rows = np.flatnonzero(last & ~first)  # users with >= 2 clicks
    train_next = np.flatnonzero(~first & ~last)
    bigram: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for a, b in zip(item[train_next - 1], item[train_next]):
        bigram[a][b] += 1
    pop = [i for i, _ in collections.Counter(item[~last]).most_common(10)]
    hit_pop = hit_bigram = 0
    for r in eval_rows:
        target, seen = item[r], item[r - 1]
        hit_pop += target in pop
        # bigram top-10, backed off to popularity when the previous item has few successors
        ranked = [b for b, _ in bigram[seen].most_common(10)]
        ranked += [p for p in pop if p not in ranked][: 10 - len(ranked)]
        hit_bigram += target in ranked
    hit_pop, hit_bigram = hit_pop / len(eval_rows), hit_bigram / len(eval_rows)
    assert hit_bigram > 0.3 and hit_bigram > 1.5 * hit_pop, (hit_bigram, hit_pop)


# ---------------------------------------------------------------------------- CLI


def test_cli_runs_and_refuses_to_overwrite(tmp_path, capsys):
    args = ["data", "synth", "--users", "300", "--items", "50", "--days", "2", "--workers", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    assert "events:" in capsys.readouterr().out
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("bad", [["--users", "0"], ["--items", "5"], ["--start-date", "2026-13-01"], ["p_drift=2"]])
def test_cli_bad_input(tmp_path, capsys, bad):
    assert main(["data", "synth", "--out", str(tmp_path)] + bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "events").exists()


# ---------------------------------------------------------------------------- product lines


def test_product_lines_name_titles_and_hold_successors(synth_cfg):
    cfg = dataclasses.replace(synth_cfg, line_size=5)
    plain, cat = synth.build_catalog(synth_cfg), synth.build_catalog(cfg)
    # the lines draw from their own stream: topics, popularity and the complementary successor are unchanged
    assert np.array_equal(plain.topic, cat.topic) and np.array_equal(plain.popularity, cat.popularity)
    assert np.array_equal(plain.successors[:, -1], cat.successors[:, -1]) and plain.line is None
    line = cat.line
    sizes = np.bincount(line)
    assert sizes.max() == 5 and sizes.min() >= 1
    # a line never crosses topics; every topic is cut into ceil(size / 5) lines
    assert all(len(set(cat.topic[line == k])) == 1 for k in range(0, len(sizes), 7))
    assert len(sizes) == int(np.ceil(np.bincount(cat.topic) / 5).sum())
    same = cat.successors[:, :-1]
    multi = sizes[line] > 1
    assert (line[same[multi]] == line[multi, None]).all()  # same-topic successors are the line's other items
    assert (same[multi] != np.arange(len(line))[multi, None]).all()  # never the item itself
    assert np.array_equal(same[~multi], plain.successors[~multi, :-1])  # singleton lines keep their topic successors
    # each title is the line-less title with one word added: the line's name, shared by the line only
    plain_titles = synth.items_table(synth_cfg, plain).column("title").to_pylist()
    titles = synth.items_table(cfg, cat).column("title").to_pylist()
    name = {}
    for i, (a, b) in enumerate(zip(plain_titles, titles)):
        words = b.split()
        extra = [w for j, w in enumerate(words) if words[:j] + words[j + 1 :] == a.split()]
        assert extra, (a, b)
        name.setdefault(int(line[i]), set(extra))
        name[int(line[i])] &= set(extra)
    assert all(name.values())  # one name common to every item of a line
    firsts = [sorted(v)[0] for v in name.values()]
    assert len(set(firsts)) == len(firsts)  # and different lines have different names


def test_line_size_must_not_be_negative(tmp_path):
    with pytest.raises(ConfigError, match="line_size"):
        SynthConfig(out=str(tmp_path), line_size=-1)
