"""``cobra data synth``: realistic, learnable synthetic recommendation logs at any scale.

The generative story (every number below is a module constant or a SynthConfig field):

* **Catalogue** (a function of ``seed`` alone). ``items`` items, ids ``0..items-1``, fall into
  ``topics`` latent topics of varying size. Each topic has its own pseudo-word vocabulary
  (nouns, adjectives, brands), a category path ``Group > Subcategory > Leaf`` and a price level.
  Titles are drawn mostly from the topic's vocabulary (plus shared generic words as noise), so
  text carries the topic. Inside a topic, popularity is Zipf(``popularity_alpha``) over a random
  rank order; topics themselves differ in popularity. Each item has ``SUCCESSORS`` successors
  (mostly same-topic, popularity-biased, one from a "complementary" topic). With ``line_size``
  > 0 each topic is also cut into product lines of that many random items; a line's name is a
  word of each of its titles, and the same-topic successors are the line's other items, so the
  text predicts what follows (as a series or a brand's range does in a real shop).
* **Users** (shard ``s`` draws from ``SeedSequence(seed, spawn_key=(1, s, chunk))``). A user has
  1-3 topics with Dirichlet weights (topics picked with popularity bias) and a heavy-tailed
  (lognormal) number of clicks with mean ``mean_events``. Click ``k+1`` is, with probability
  ``p_sequential``, a successor of click ``k``; otherwise an item drawn by popularity from the
  last item's topic (``P_STAY_TOPIC``) or from a topic of the user's mixture. With probability
  ``p_drift`` per click one of the user's topics is replaced (interest drift).
* **Time**: clicks are grouped into sessions; sessions start on a uniform day at a diurnal hour,
  clicks inside a session are exponential gaps apart; a user's timestamps never decrease.
* **Conversions**: a click converts with probability ``conversion_rate`` times a price factor
  (cheaper converts more) times a main-topic factor; the conversion row has the same user and
  item, a ``ts`` no earlier than the click's and ``value = price * quantity`` (float32). Clicks have null value.

Output layout of ``cobra data synth --out DIR``::

    DIR/items.parquet                              ITEMS_SCHEMA, item_id 0..items-1, sorted
    DIR/events/day=YYYY-MM-DD/part-SSSSS.parquet   EVENTS_SCHEMA; one file per (shard SSSSS, day),
                                                   rows sorted by (user_id, ts)
    DIR/truth/items_truth.parquet                  item_id, topic, popularity, successors (, line)
    DIR/config.yaml                                the resolved config
    DIR/synth_stats.json                           counts and wall time (written last: marks success)

The output is a pure function of the config except ``workers``/``overwrite``: shards are
independent (a cluster could generate them side by side) and each is produced in chunks of
``chunk_users`` users, so memory does not grow with ``users``. Event files are written under
hidden temp names and renamed when their shard is complete.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from cobra_scale.config import save_config
from cobra_scale.data.configs import SynthConfig
from cobra_scale.data.io import shard_name, write_table
from cobra_scale.data.schemas import EVENTS_SCHEMA, ITEMS_SCHEMA, SECONDS_PER_DAY, day_start
from cobra_scale.errors import CobraError

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Constants of the generative story (not config fields: they shape realism, not scale).

USERS_PER_SHARD = 100_000  # shards=0 -> ceil(users / USERS_PER_SHARD)
SUCCESSORS = 4  # successor list length; columns 0..2 same topic, column 3 a complementary topic
SUCCESSOR_P = np.array([0.42, 0.26, 0.18, 0.14])  # skewed so the "most frequent successor" is learnable
SUCCESSOR_FLATTEN = 0.7  # successors are drawn with Zipf exponent alpha*0.7: diverse but popular-biased
TOPICS_PER_USER_P = np.array([0.35, 0.40, 0.25])  # P(user has 1, 2, 3 topics)
TOPIC_POPULARITY_BIAS = 0.8  # users pick topic t with prob ∝ topic_mass[t] ** 0.8
P_STAY_TOPIC = 0.5  # a non-sequential click stays in the previous click's topic with this prob
EVENTS_SIGMA = 1.0  # lognormal sigma of clicks per user (heavy tail; ~14% of users < 3 clicks)
MAX_EVENTS_FACTOR = 50  # clicks per user are capped at 50 * mean_events (bounds the step loop)
P_NEW_SESSION = 0.3  # probability that a click (after the first) starts a new session
SESSION_GAP_S = 75.0  # mean seconds between clicks of one session
CONVERSION_DELAY_S = 600.0  # mean seconds from a click to its conversion
MAIN_TOPIC_BOOST = (0.5, 1.3)  # conversion factor for (other topic, user's main topic); ~63% of clicks match, so mean ~1
PRICE_ELASTICITY = 0.3  # conversion factor ∝ price ** -0.3 (cheap items convert more)
QUANTITY_P = 0.7  # quantity ~ Geometric(0.7) >= 1
P_BRAND_NULL, P_PRICE_NULL, P_DESCRIPTION = 0.10, 0.08, 0.70
# Relative activity per UTC hour: quiet nights, lunch bump, evening peak.
HOUR_WEIGHTS = np.array([2, 1, 1, 1, 1, 1, 2, 4, 5, 5, 5, 6, 7, 7, 6, 6, 6, 7, 8, 9, 10, 10, 8, 4], dtype=np.float64)

# Word material. Pseudo-words are built from syllables so each topic owns distinct tokens.
_ONSETS = ("b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "cl", "dr", "fl", "gr", "pr", "st", "tr", "sh", "ch")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ea", "io", "ou")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "x", "que", "ne", "th")
_GROUPS = ("Beauty", "Home & Kitchen", "Sports & Outdoors", "Electronics", "Toys & Games", "Health", "Garden",
           "Fashion", "Books", "Pet Supplies", "Automotive", "Office", "Grocery", "Baby", "Tools",
           "Arts & Crafts", "Music", "Travel")  # fmt: skip
_CATEGORY_TYPES = ("Care", "Gear", "Essentials", "Tools", "Accessories", "Supplies", "Decor", "Basics")
_BRAND_SUFFIXES = ("", "", "", " Labs", " & Co.", " Studio", " Works", " Home")
_GENERIC_ADJ = ("Classic", "Premium", "New", "Original", "Deluxe", "Essential", "Mini", "Pro", "Natural", "Ultra", "Everyday", "Compact")
_GENERIC_TAIL = ("Set", "Kit", "Pack", "Bundle", "Edition", "Refill", "2-Pack", "Travel Size")
_FILLERS = ("Ships in recyclable packaging.", "A customer favourite.", "Easy to use every day.",
            "Backed by a 30-day guarantee.", "Limited stock.", "Great as a gift.")  # fmt: skip
NOUNS_PER_TOPIC, ADJS_PER_TOPIC, BRANDS_PER_TOPIC = 12, 8, 3


# ----------------------------------------------------------------------------------------------
# Catalogue


@dataclass
class Catalog:
    """The numeric side of the catalogue: everything a shard worker needs (M items, T topics).

    ``slot_*`` arrays list items grouped by topic (topic 0 first), most popular first inside a
    topic; ``slot_cdf[j] = topic + within-topic cumulative popularity`` so that sampling an item of
    topic ``t`` by popularity is one ``searchsorted(slot_cdf, t + u)`` for all users at once.
    """

    topic: np.ndarray  # (M,) int32 latent topic of each item
    price: np.ndarray  # (M,) float64 true price in currency units (the catalogue hides some)
    popularity: np.ndarray  # (M,) float64 prior share of clicks, sums to 1
    conv_factor: np.ndarray  # (M,) float64 price modulation of the conversion prob, popularity-mean 1
    successors: np.ndarray  # (M, SUCCESSORS) int64 successor item ids
    slot_item: np.ndarray  # (M,) int64 item ids grouped by topic, by popularity rank
    slot_cdf: np.ndarray  # (M,) float64 see class doc
    topic_end: np.ndarray  # (T,) int64 one past the last slot of each topic
    topic_cdf: np.ndarray  # (T,) float64 cumulative prob that a user picks each topic
    line: Optional[np.ndarray] = None  # (M,) int64 product line of each item (line_size > 0), else None

    @property
    def n_topics(self) -> int:
        return len(self.topic_end)


def resolve_topics(cfg: SynthConfig) -> int:
    """Number of topics: ``cfg.topics`` or items/60 clamped to [8, 512], never above items."""
    t = cfg.topics or min(512, max(8, cfg.items // 60))
    return max(1, min(t, cfg.items))


def resolve_shards(cfg: SynthConfig) -> int:
    """Number of user shards: ``cfg.shards`` or one per 100k users, never above users."""
    return max(1, min(cfg.shards or math.ceil(cfg.users / USERS_PER_SHARD), cfg.users))


def _rng(seed: int, *key: int) -> np.random.Generator:
    # Independent streams per purpose / shard / chunk: adding a shard never shifts another.
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _within_topic_cdf(topic_sorted: np.ndarray, rank: np.ndarray, alpha: float) -> np.ndarray:
    """``topic + cumulative Zipf(alpha) mass`` per slot, each topic's last slot exactly topic+1."""
    w = (rank + 1.0) ** -alpha
    sums = np.bincount(topic_sorted, weights=w)
    cum = np.cumsum(w)
    start_cum = np.concatenate([[0.0], np.cumsum(sums)[:-1]])
    within = (cum - start_cum[topic_sorted]) / sums[topic_sorted]
    last = np.r_[topic_sorted[1:] != topic_sorted[:-1], True]
    within[last] = 1.0  # exact, so t + u (u < 1) never spills into topic t+1's slots
    return topic_sorted + within


def sample_in_topic(slot_cdf: np.ndarray, slot_item: np.ndarray, topic_end: np.ndarray, topic: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Item ids drawn by popularity from ``topic`` (n,) with uniforms ``u`` (n,) in [0, 1)."""
    idx = np.searchsorted(slot_cdf, topic + u, side="right")
    return slot_item[np.minimum(idx, topic_end[topic] - 1)]  # guard t + u rounding up to t + 1


def build_catalog(cfg: SynthConfig) -> Catalog:
    """The numeric catalogue, a function of (seed, items, topics, popularity_alpha) only."""
    rng = _rng(cfg.seed, 0, 0)
    m, t = cfg.items, resolve_topics(cfg)
    # Topic sizes vary (Dirichlet(2) shares) with a floor so every topic has a few items.
    floor = max(1, min(3, m // t))
    sizes = floor + rng.multinomial(m - floor * t, rng.dirichlet(np.full(t, 2.0)))
    # Item ids are a random permutation of topic blocks: ids carry no topic information.
    topic = rng.permutation(np.repeat(np.arange(t, dtype=np.int32), sizes))
    slot_item = np.argsort(topic, kind="stable").astype(np.int64)  # ids ascending inside a topic
    topic_sorted = topic[slot_item]
    topic_end = np.cumsum(sizes).astype(np.int64)
    rank = np.arange(m) - (topic_end - sizes)[topic_sorted]  # random rank order, since ids are random
    slot_cdf = _within_topic_cdf(topic_sorted, rank, cfg.popularity_alpha)
    flat_cdf = _within_topic_cdf(topic_sorted, rank, cfg.popularity_alpha * SUCCESSOR_FLATTEN)

    # Topic popularity: bigger topics draw more users, with noise on top.
    mass = sizes**0.9 * rng.lognormal(0.0, 0.7, t)
    topic_p = mass**TOPIC_POPULARITY_BIAS
    topic_p /= topic_p.sum()
    zipf = (rank + 1.0) ** -cfg.popularity_alpha
    popularity = np.empty(m)
    popularity[slot_item] = topic_p[topic_sorted] * zipf / np.bincount(topic_sorted, weights=zipf)[topic_sorted]

    # Prices: a lognormal level per topic, lognormal spread per item, shop-style .99 endings.
    level = rng.lognormal(np.log(25.0), 0.8, t)
    price = np.maximum(np.round(level[topic] * rng.lognormal(0.0, 0.35, m)) - 0.01, 0.99)
    conv = (price / np.median(price)) ** -PRICE_ELASTICITY
    conv = np.clip(conv / np.dot(conv, popularity), 0.2, 3.0)

    # Successors: 3 same-topic (flattened popularity, never the item itself when avoidable)
    # and 1 from the topic's complementary partner topic (full popularity).
    succ = np.empty((m, SUCCESSORS), dtype=np.int64)
    items = np.arange(m)
    slot_of = np.empty(m, dtype=np.int64)
    slot_of[slot_item] = np.arange(m)
    start = (topic_end - sizes)[topic]
    neighbour = slot_item[start + (slot_of - start + 1) % sizes[topic]]  # next slot of the same topic
    for j in range(SUCCESSORS - 1):
        s = sample_in_topic(flat_cdf, slot_item, topic_end, topic, rng.random(m))
        succ[:, j] = np.where(s == items, neighbour, s)
    partner = (np.arange(t) + 1 + rng.integers(0, max(t - 1, 1), t)) % t if t > 1 else np.zeros(1, dtype=np.int64)
    succ[:, SUCCESSORS - 1] = sample_in_topic(slot_cdf, slot_item, topic_end, partner[topic], rng.random(m))
    line = None
    if cfg.line_size > 0:
        line = _product_lines(cfg, topic, succ)
    return Catalog(
        topic=topic, price=price, popularity=popularity, conv_factor=conv, successors=succ,
        slot_item=slot_item, slot_cdf=slot_cdf, topic_end=topic_end, topic_cdf=np.cumsum(topic_p), line=line,
    )  # fmt: skip


def _product_lines(cfg: SynthConfig, topic: np.ndarray, succ: np.ndarray) -> np.ndarray:
    """Cut every topic into product lines of ``line_size`` random items; returns each item's line.

    The same-topic successors (columns 0..SUCCESSORS-2) of an item in a line of 2+ items are
    redrawn uniformly among the other items of its line (``succ`` is changed in place), so
    what follows an item is predictable from the line name its title carries. Its own random
    stream: the rest of the catalogue is the same as with ``line_size=0``.
    """
    rng = _rng(cfg.seed, 0, 2)
    m = len(topic)
    order = np.lexsort((rng.random(m), topic))  # items by topic, random inside a topic
    sorted_topic = topic[order]
    pos = np.arange(m) - np.searchsorted(sorted_topic, sorted_topic)  # position inside the topic
    key = sorted_topic.astype(np.int64) * m + pos // cfg.line_size  # (topic, chunk) -> one line each
    _, line_sorted = np.unique(key, return_inverse=True)
    line = np.empty(m, dtype=np.int64)
    line[order] = line_sorted
    start = np.searchsorted(line_sorted, np.arange(line_sorted[-1] + 1))  # first position of each line in ``order``
    size = np.diff(np.r_[start, m])
    item_start, item_size = start[line], size[line]
    rank = np.empty(m, dtype=np.int64)
    rank[order] = np.arange(m) - start[line_sorted]  # position of each item inside its line
    multi = item_size > 1
    for j in range(SUCCESSORS - 1):
        step = 1 + (rng.random(m) * np.maximum(item_size - 1, 1)).astype(np.int64)  # another member, never itself
        other = order[item_start + (rank + step) % item_size]
        succ[:, j] = np.where(multi, other, succ[:, j])
    return line


def _pseudo_words(rng: np.random.Generator, n: int, used: set[str]) -> list[str]:
    """``n`` new lowercase pseudo-words (2-3 syllables), none already in ``used``."""
    out: list[str] = []
    while len(out) < n:
        k = 2 + int(rng.random() < 0.4)
        w = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _NUCLEI[rng.integers(len(_NUCLEI))] for _ in range(k))
        w += _CODAS[rng.integers(len(_CODAS))]
        if 4 <= len(w) <= 11 and w not in used:
            used.add(w)
            out.append(w)
    return out


def items_table(cfg: SynthConfig, cat: Catalog) -> pa.Table:
    """The item catalogue (ITEMS_SCHEMA, sorted by item_id) with topic-bearing text.

    Uses its own random stream so text changes never alter the numeric catalogue.
    """
    rng = _rng(cfg.seed, 0, 1)
    t, m = cat.n_topics, len(cat.topic)
    used: set[str] = set()
    nouns = [_pseudo_words(rng, NOUNS_PER_TOPIC, used) for _ in range(t)]
    adjs = [_pseudo_words(rng, ADJS_PER_TOPIC, used) for _ in range(t)]
    brands = [[w.capitalize() + _BRAND_SUFFIXES[rng.integers(len(_BRAND_SUFFIXES))] for w in _pseudo_words(rng, BRANDS_PER_TOPIC, used)] for _ in range(t)]
    n_groups = min(len(_GROUPS), max(3, t // 6))
    group = rng.integers(0, n_groups, t)
    subcat = [f"{nouns[k][0].capitalize()} {_CATEGORY_TYPES[rng.integers(len(_CATEGORY_TYPES))]}" for k in range(t)]

    # Per-item draws up front (vectorised); the loop below only assembles strings.
    brand_i = rng.integers(0, BRANDS_PER_TOPIC, m)
    brand_null = rng.random(m) < P_BRAND_NULL
    brand_in_title = rng.random(m) < 0.5
    n_adj = 1 + (rng.random(m) < 0.5)
    adj_i = rng.integers(0, ADJS_PER_TOPIC, (m, 2))
    adj_generic = rng.random((m, 2)) < 0.15  # shared generic words: text noise across topics
    gen_adj = rng.integers(0, len(_GENERIC_ADJ), (m, 2))
    noun_i = rng.integers(0, NOUNS_PER_TOPIC, (m, 3))
    tail = np.where(rng.random(m) < 0.3, rng.integers(0, len(_GENERIC_TAIL), m), -1)
    has_desc = rng.random(m) < P_DESCRIPTION
    filler = rng.integers(0, len(_FILLERS), m)
    price_null = rng.random(m) < P_PRICE_NULL
    # product lines (line_size > 0): one pseudo-word name per line, in every title of the line
    line_names = None if cat.line is None else [w.capitalize() for w in _pseudo_words(rng, int(cat.line.max()) + 1, used)]

    titles, brand_col, cats, descs = [], [], [], []
    for i in range(m):
        k = int(cat.topic[i])
        brand = brands[k][brand_i[i]]
        words = [brand] if brand_in_title[i] and not brand_null[i] else []
        if line_names is not None:
            words.append(line_names[cat.line[i]])
        a = [(_GENERIC_ADJ[gen_adj[i, j]] if adj_generic[i, j] else adjs[k][adj_i[i, j]].capitalize()) for j in range(n_adj[i])]
        noun = nouns[k][noun_i[i, 0]]
        words += a + [noun.capitalize()]
        if tail[i] >= 0:
            words.append(_GENERIC_TAIL[tail[i]])
        titles.append(" ".join(words))
        brand_col.append(None if brand_null[i] else brand)
        cats.append([f"{_GROUPS[group[k]]} > {subcat[k]} > {noun.capitalize()}s"])
        if has_desc[i]:
            descs.append(
                f"{a[0]} {noun} by {brand}. Pairs well with {nouns[k][noun_i[i, 1]]} and "
                f"{adjs[k][adj_i[i, 1]]} {nouns[k][noun_i[i, 2]]}. {_FILLERS[filler[i]]}"
            )
        else:
            descs.append(None)
    return pa.Table.from_arrays(
        [
            pa.array(np.arange(m, dtype=np.int64)),
            pa.array(titles, pa.string()),
            pa.array(brand_col, pa.string()),
            pa.array(cats, pa.list_(pa.string())),
            pa.array(cat.price, pa.float64(), mask=price_null),
            pa.array(descs, pa.string()),
        ],
        schema=ITEMS_SCHEMA,
    )


def truth_table(cat: Catalog) -> pa.Table:
    """Ground truth per item (for diagnosing semantic ids): topic, prior popularity, successors."""
    m = len(cat.topic)
    cols = {
        "item_id": pa.array(np.arange(m, dtype=np.int64)),
        "topic": pa.array(cat.topic),
        "popularity": pa.array(cat.popularity),
        "successors": pa.FixedSizeListArray.from_arrays(pa.array(cat.successors.ravel()), SUCCESSORS).cast(pa.list_(pa.int64())),
    }
    if cat.line is not None:
        cols["line"] = pa.array(cat.line)
    return pa.table(cols)


# ----------------------------------------------------------------------------------------------
# Users and events


def generate_chunk(cat: Catalog, cfg: SynthConfig, first_user: int, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Events of users ``first_user .. first_user+n-1``, vectorised across users.

    Returns columns of E rows sorted by (user_id, ts, click-before-conversion):
    ``user_id`` (E,) int64, ``item_id`` (E,) int64, ``ts`` (E,) int64 seconds since
    ``start_date`` 00:00 UTC, in ``[0, days * 86400)``, ``conversion`` (E,) bool,
    ``value`` (E,) float32 (revenue of conversions, 0 for clicks).
    """
    # --- clicks per user: lognormal with mean mean_events, >= 1, capped.
    mu = math.log(cfg.mean_events) - EVENTS_SIGMA**2 / 2
    cap = max(10, int(MAX_EVENTS_FACTOR * cfg.mean_events))
    length = np.clip(np.rint(rng.lognormal(mu, EVENTS_SIGMA, n)), 1, cap).astype(np.int64)
    total = int(length.sum())
    offset = np.cumsum(length) - length  # (n,) first event row of each user (user-major layout)

    # Users are processed longest first, so the users still active at step k are a prefix.
    order = np.argsort(-length, kind="stable")
    active = n - np.cumsum(np.bincount(length, minlength=int(length.max()) + 1))[:-1]  # active[k] = #(length > k)
    dest = offset[order]  # (n,) row of step 0 per sorted user; step k writes to dest + k

    # --- interests: 1-3 topics per sorted user with Dirichlet(1) weights.
    n_top = (rng.random(n)[:, None] > np.cumsum(TOPICS_PER_USER_P)[None, :-1]).sum(1) + 1  # (n,) 1..3
    topics = np.searchsorted(cat.topic_cdf, rng.random((n, 3)) * cat.topic_cdf[-1], side="right")
    topics = np.minimum(topics, cat.n_topics - 1)
    weights = rng.gamma(1.0, size=(n, 3)) * (np.arange(3)[None, :] < n_top[:, None])
    main_slot = weights.argmax(1)
    cw = np.cumsum(weights, 1) / weights.sum(1, keepdims=True)

    item = np.empty(total, dtype=np.int64)
    main_match = np.empty(total, dtype=bool)  # clicked item is in the user's main topic (now)
    prev = np.zeros(n, dtype=np.int64)
    succ_cdf = np.cumsum(SUCCESSOR_P)
    for k in range(len(active)):
        a = int(active[k])
        if k > 0 and cfg.p_drift > 0:
            drift = np.flatnonzero(rng.random(a) < cfg.p_drift)
            if len(drift):  # replace one of the user's topics with a fresh popularity-biased one
                slot = rng.integers(0, n_top[drift])
                new = np.searchsorted(cat.topic_cdf, rng.random(len(drift)) * cat.topic_cdf[-1], side="right")
                topics[drift, slot] = np.minimum(new, cat.n_topics - 1)
        nxt = np.empty(a, dtype=np.int64)
        seq = (rng.random(a) < cfg.p_sequential) if k > 0 else np.zeros(a, dtype=bool)
        s = np.flatnonzero(seq)
        if len(s):
            j = np.searchsorted(succ_cdf, rng.random(len(s)) * succ_cdf[-1], side="right")
            nxt[s] = cat.successors[prev[s], np.minimum(j, SUCCESSORS - 1)]
        f = np.flatnonzero(~seq)
        if len(f):
            slot = np.minimum((rng.random(len(f))[:, None] >= cw[f]).sum(1), n_top[f] - 1)
            topic = topics[f, slot]
            if k > 0:  # stay in the previous click's topic half of the time
                stay = rng.random(len(f)) < P_STAY_TOPIC
                topic = np.where(stay, cat.topic[prev[f]], topic)
            nxt[f] = sample_in_topic(cat.slot_cdf, cat.slot_item, cat.topic_end, topic, rng.random(len(f)))
        prev[:a] = nxt
        item[dest[:a] + k] = nxt
        main_match[dest[:a] + k] = cat.topic[nxt] == topics[np.arange(a), main_slot[:a]]

    # --- timestamps (user-major rows): sessions at a random day and diurnal hour, then
    # exponential gaps inside a session; a running max keeps each user's ts non-decreasing.
    period = cfg.days * SECONDS_PER_DAY
    user_local = np.repeat(np.arange(n), length)  # (E,) user index inside the chunk
    step = np.arange(total) - offset[user_local]
    new_session = (step == 0) | (rng.random(total) < P_NEW_SESSION)
    session = np.cumsum(new_session) - 1  # (E,) session index inside the chunk
    n_sessions = int(session[-1]) + 1
    hour_cdf = np.cumsum(HOUR_WEIGHTS) / HOUR_WEIGHTS.sum()
    hour = np.minimum(np.searchsorted(hour_cdf, rng.random(n_sessions), side="right"), 23)
    start = rng.integers(0, cfg.days, n_sessions) * SECONDS_PER_DAY + hour * 3600 + rng.integers(0, 3600, n_sessions)
    session_user = user_local[new_session]
    start = start[np.lexsort((start, session_user))]  # a user's sessions in time order
    gap = np.where(new_session, 0, np.ceil(rng.exponential(SESSION_GAP_S, total))).astype(np.int64)
    within = np.cumsum(gap)
    within -= within[new_session][session]
    ts = start[session] + within
    # strictly increasing per user (at least 1 s apart): the log never holds two identical
    # events, so `sessionize --strict` accepts our own output
    span = 2 * period + int(step.max(initial=0)) + 1  # keeps users apart in the running max
    ts = np.maximum.accumulate(ts - step + user_local * span) - user_local * span + step
    # the log ends with the period: clicks pushed past it are cut (as a real export would)
    keep = ts < period
    if not keep.all():
        item, main_match, user_local, ts = item[keep], main_match[keep], user_local[keep], ts[keep]
        total = len(ts)

    # --- conversions: a thinned copy of the clicks, shortly after them.
    p = cfg.conversion_rate * cat.conv_factor[item] * np.where(main_match, MAIN_TOPIC_BOOST[1], MAIN_TOPIC_BOOST[0])
    conv = np.flatnonzero(rng.random(total) < p)
    conv_ts = np.minimum(ts[conv] + np.ceil(rng.exponential(CONVERSION_DELAY_S, len(conv))).astype(np.int64), period - 1)
    conv_ts = np.maximum(conv_ts, ts[conv])
    value = (cat.price[item[conv]] * rng.geometric(QUANTITY_P, len(conv))).astype(np.float32)

    user = np.concatenate([user_local, user_local[conv]])
    ts_all = np.concatenate([ts, conv_ts])
    is_conv = np.r_[np.zeros(total, dtype=bool), np.ones(len(conv), dtype=bool)]
    o = np.lexsort((is_conv, ts_all, user))  # stable: equal keys keep generation order
    return {
        "user_id": (user[o] + first_user).astype(np.int64),
        "item_id": np.concatenate([item, item[conv]])[o],
        "ts": ts_all[o],
        "conversion": is_conv[o],
        "value": np.r_[np.zeros(total, dtype=np.float32), value][o],
    }


_EVENT_TYPES = pa.array(["click", "conversion"], pa.string())


def _events_table(cols: dict[str, np.ndarray], idx: np.ndarray, t0: int) -> pa.Table:
    conv = cols["conversion"][idx]
    return pa.Table.from_arrays(
        [
            pa.array(cols["user_id"][idx]),
            pa.array(cols["item_id"][idx]),
            pa.array(cols["ts"][idx] + t0),
            pc.take(_EVENT_TYPES, pa.array(conv.astype(np.int8))),
            pa.array(cols["value"][idx], pa.float32(), mask=~conv),
        ],
        schema=EVENTS_SCHEMA,
    )


def generate_shard(cat: Catalog, cfg: SynthConfig, shard: int, lo: int, hi: int, out: str) -> dict[str, Any]:
    """Write the events of users ``lo..hi-1`` (shard ``shard``) and return its counts.

    One Parquet file per day with events, ``events/day=D/part-{shard:05d}.parquet``, appended
    one row group per chunk; files live under a hidden temp name until the shard is done.
    """
    t0 = day_start(cfg.start_date)
    days = [time.strftime("%Y-%m-%d", time.gmtime(t0 + d * SECONDS_PER_DAY)) for d in range(cfg.days)]
    events_dir = Path(out) / "events"
    writers: dict[int, tuple[pq.ParquetWriter, Path, Path]] = {}
    clicks = conversions = 0
    try:
        for c, first in enumerate(range(lo, hi, cfg.chunk_users)):
            n = min(cfg.chunk_users, hi - first)
            cols = generate_chunk(cat, cfg, first, n, _rng(cfg.seed, 1, shard, c))
            n_conv = int(cols["conversion"].sum())
            conversions += n_conv
            clicks += len(cols["ts"]) - n_conv
            day = cols["ts"] // SECONDS_PER_DAY
            by_day = np.argsort(day, kind="stable")  # keeps (user, ts) order inside a day
            bounds = np.r_[0, np.cumsum(np.bincount(day, minlength=cfg.days))]
            for d in np.flatnonzero(np.diff(bounds)):
                if d not in writers:
                    final = events_dir / f"day={days[d]}" / shard_name(shard)
                    final.parent.mkdir(parents=True, exist_ok=True)
                    tmp = final.with_name(f".{final.name}.tmp")
                    writers[d] = (pq.ParquetWriter(tmp, EVENTS_SCHEMA, compression="zstd"), tmp, final)
                writers[d][0].write_table(_events_table(cols, by_day[bounds[d] : bounds[d + 1]], t0))
    finally:
        for w, _, _ in writers.values():
            w.close()
    for _, tmp, final in writers.values():  # the shard is complete: publish its files
        os.replace(tmp, final)
    return {"shard": shard, "users": hi - lo, "clicks": clicks, "conversions": conversions, "files": len(writers)}


_WORKER_CATALOG: Optional[Catalog] = None


def _init_worker(cat: Catalog) -> None:
    global _WORKER_CATALOG
    _WORKER_CATALOG = cat


def _worker_shard(cfg: SynthConfig, shard: int, lo: int, hi: int, out: str) -> dict[str, Any]:
    assert _WORKER_CATALOG is not None
    return generate_shard(_WORKER_CATALOG, cfg, shard, lo, hi, out)


# ----------------------------------------------------------------------------------------------
# Entry point


def _prepare_out(cfg: SynthConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise CobraError(f"--out {out} exists and is not a folder")
    events = out / "events"
    if events.exists() and any(events.iterdir()):
        if not cfg.overwrite:
            raise CobraError(f"{events} is not empty; pass --overwrite to replace it")
        shutil.rmtree(events)
    try:
        (out / "truth").mkdir(parents=True, exist_ok=True)
        events.mkdir(exist_ok=True)
        (out / "synth_stats.json").unlink(missing_ok=True)  # its presence marks a finished run
    except OSError as exc:
        raise CobraError(f"cannot write to {out}: {exc.strerror or exc}") from exc
    return out


def run(cfg: SynthConfig) -> dict[str, Any]:
    """Generate the synthetic dataset described by ``cfg`` under ``cfg.out``.

    Returns a summary: users, items, topics, events, clicks, conversions, days, shards,
    files (event files written), wall_s and out.
    """
    start = time.perf_counter()
    out = _prepare_out(cfg)
    save_config(cfg, out)
    cat = build_catalog(cfg)
    write_table(items_table(cfg, cat), out / "items.parquet")
    write_table(truth_table(cat), out / "truth" / "items_truth.parquet")

    n_shards = resolve_shards(cfg)
    bounds = [cfg.users * s // n_shards for s in range(n_shards + 1)]
    jobs = [(cfg, s, bounds[s], bounds[s + 1], str(out)) for s in range(n_shards)]
    workers = min(cfg.workers or os.cpu_count() or 1, n_shards)
    log.info("%d users in %d shards on %d workers, %d items, %d topics", cfg.users, n_shards, workers, cfg.items, cat.n_topics)
    results = []
    with tqdm(total=n_shards, desc="synth shards", unit="shard") as bar:
        if workers == 1:
            for job in jobs:
                results.append(generate_shard(cat, *job))
                bar.update()
        else:
            # spawn: a clean interpreter per worker (forking a process that already ran pyarrow's
            # thread pools can deadlock); the catalogue is shipped once per worker.
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(cat,)) as pool:
                for fut in as_completed([pool.submit(_worker_shard, *job) for job in jobs]):
                    results.append(fut.result())
                    bar.update()

    clicks = sum(r["clicks"] for r in results)
    conversions = sum(r["conversions"] for r in results)
    summary = {
        "users": cfg.users,
        "items": cfg.items,
        "topics": cat.n_topics,
        "events": clicks + conversions,
        "clicks": clicks,
        "conversions": conversions,
        "days": cfg.days,
        "shards": n_shards,
        "files": sum(r["files"] for r in results),
        "wall_s": round(time.perf_counter() - start, 2),
        "out": str(out),
    }
    (out / "synth_stats.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
