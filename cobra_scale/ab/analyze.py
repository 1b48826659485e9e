"""``cobra ab analyze``: the decision report of an A/B test from per-user outcomes.

Per experiment and arm: users, conversion rate (share of users with >= 1 conversion), ARPU
(revenue per user); per treatment arm against the control: relative lift with (1 - alpha)
CIs by the delta method and the percentile bootstrap, p-values (two-proportion z-test for
conversion, Welch's t-test for ARPU); per experiment a sample-ratio-mismatch chi-square
test. An SRM means the split itself is broken (a bug in assignment, logging or filtering):
the lifts are then not trustworthy, and the report says so at the top, in capitals.

Writes ``OUT/report.md``, ``OUT/lift.png`` and ``OUT/analysis.json``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cobra_scale.ab import stats
from cobra_scale.ab.configs import ABConfig, AnalyzeConfig
from cobra_scale.config import save_config
from cobra_scale.data.io import read_table
from cobra_scale.errors import ConfigError, DataError

log = logging.getLogger(__name__)

REQUIRED = ("experiment", "user_id", "arm", "conversions", "revenue", "all_conversions", "all_revenue")


def analyze_experiment(
    df: pd.DataFrame,
    control: str,
    expected_shares: dict[str, float],
    conversion_col: str = "conversions",
    revenue_col: str = "revenue",
    alpha: float = 0.05,
    srm_threshold: float = 0.001,
    bootstrap: int = 2000,
    seed: int = 0,
) -> dict:
    """Statistics of one experiment. ``df``: one row per user with ``arm`` and the metric columns.

    ``expected_shares`` lists every arm of the experiment (arms with no user count as 0 in the
    SRM test); ``control`` must be one of them.
    """
    arms = list(expected_shares)
    seen = sorted(set(df["arm"]) - set(arms))
    if seen:
        raise DataError(f"outcomes hold arm(s) {', '.join(seen)} that the experiments file does not list ({', '.join(arms)})")
    if control not in arms:
        raise ConfigError(f"control arm '{control}' is not one of the arms ({', '.join(arms)})")
    converted = {a: (df.loc[df["arm"] == a, conversion_col].to_numpy() > 0).astype(np.float64) for a in arms}
    revenue = {a: df.loc[df["arm"] == a, revenue_col].to_numpy(dtype=np.float64) for a in arms}
    per_arm = {}
    for a in arms:
        n = len(converted[a])
        rev = stats.Moments.of(revenue[a]) if n else stats.Moments(0, math.nan, 0.0)
        per_arm[a] = {
            "users": n,
            "expected_share": expected_shares[a],
            "observed_share": n / len(df) if len(df) else math.nan,
            "converted_users": int(converted[a].sum()),
            "conversion_rate": float(converted[a].mean()) if n else math.nan,
            "arpu": rev.mean,
            "revenue_sd": math.sqrt(rev.var),
        }
    srm = stats.srm_test([per_arm[a]["users"] for a in arms], [expected_shares[a] for a in arms])
    comparisons = {}
    for a in arms:
        if a == control:
            continue
        conv_t, conv_c = stats.Moments.of(converted[a]), stats.Moments.of(converted[control])
        rev_t, rev_c = stats.Moments.of(revenue[a]), stats.Moments.of(revenue[control])
        z = stats.two_proportion_ztest(per_arm[a]["converted_users"], per_arm[a]["users"], per_arm[control]["converted_users"], per_arm[control]["users"])
        t = stats.welch_ttest(rev_t, rev_c)
        entry = {
            "conversion": {"delta": stats.delta_lift(conv_t, conv_c, alpha).__dict__, "z": z.statistic, "p_value": z.p_value},
            "arpu": {"delta": stats.delta_lift(rev_t, rev_c, alpha).__dict__, "t": t.statistic, "df": t.df, "p_value": t.p_value},
        }
        if bootstrap:
            entry["conversion"]["bootstrap"] = stats.bootstrap_lift(converted[a], converted[control], bootstrap, alpha, seed).__dict__
            entry["arpu"]["bootstrap"] = stats.bootstrap_lift(revenue[a], revenue[control], bootstrap, alpha, seed + 1).__dict__
        comparisons[a] = entry
    switched = int((df["arms_seen"] > 1).sum()) if "arms_seen" in df.columns else 0
    return {
        "control": control,
        "users": len(df),
        "arms": per_arm,
        "srm": {"chi2": srm.statistic, "df": srm.df, "p_value": srm.p_value, "threshold": srm_threshold, "mismatch": bool(srm.p_value < srm_threshold)},
        "users_in_several_arms": switched,
        "vs_control": comparisons,
    }


def _pct(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.{digits}f}%"


def _p(x: float) -> str:
    return "n/a" if not math.isfinite(x) else (f"{x:.2e}" if x < 1e-4 else f"{x:.4f}")


def render_markdown(results: dict, cfg: AnalyzeConfig) -> str:
    level = round(100 * (1 - cfg.alpha))
    lines = ["# A/B test report", ""]
    broken = [name for name, r in results["experiments"].items() if r["srm"]["mismatch"]]
    for name in broken:
        s = results["experiments"][name]["srm"]
        lines += [
            f"> **WARNING — SAMPLE RATIO MISMATCH in `{name}`** (chi-square {s['chi2']:.1f}, df {s['df']:.0f}, p = {_p(s['p_value'])} < {s['threshold']}).",
            "> The split does not match the configured shares: assignment, logging or filtering is broken.",
            "> Do not trust the lifts below until the cause is found.",
            "",
        ]
    metric = "conversions / revenue on recommended (shown) items" if cfg.attribution == "shown" else "any conversion / revenue in the window"
    lines += [f"Outcomes: `{results['outcomes']}`; metric: {metric}. CIs: {level}% (delta method; bootstrap percentile with {cfg.bootstrap} resamples)." if cfg.bootstrap else f"Outcomes: `{results['outcomes']}`; metric: {metric}. CIs: {level}% (delta method).", ""]
    for name, r in results["experiments"].items():
        lines += [f"## {name}", "", f"Control: `{r['control']}`; {r['users']} users. SRM chi-square p = {_p(r['srm']['p_value'])}" + (" — **MISMATCH**" if r["srm"]["mismatch"] else " (no mismatch)") + ".", ""]
        if r["users_in_several_arms"]:
            lines += [f"**{r['users_in_several_arms']} users were exposed in more than one arm** (kept in the arm of their first exposure).", ""]
        lines += ["| arm | users | share (expected) | conversion rate | ARPU |", "|---|---:|---:|---:|---:|"]
        for arm, a in r["arms"].items():
            lines.append(f"| {arm} | {a['users']} | {a['observed_share']:.4f} ({a['expected_share']:.4f}) | {a['conversion_rate']:.4f} | {a['arpu']:.4f} |")
        lines.append("")
        if r["vs_control"]:
            lines += ["| arm vs control | metric | lift | delta CI | bootstrap CI | test | p-value |", "|---|---|---:|---:|---:|---|---:|"]
            for arm, c in r["vs_control"].items():
                for metric_name, test in (("conversion", "z"), ("arpu", "Welch t")):
                    m = c[metric_name]
                    d = m["delta"]
                    b = m.get("bootstrap")
                    boot = f"[{_pct(b['low'])}, {_pct(b['high'])}]" if b else "—"
                    lines.append(f"| {arm} | {metric_name} | {_pct(d['lift'])} | [{_pct(d['low'])}, {_pct(d['high'])}] | {boot} | {test} | {_p(m['p_value'])} |")
            lines.append("")
    lines += ["![lift](lift.png)", ""]
    return "\n".join(lines)


def plot_lifts(results: dict, path: Path) -> Path:
    """Horizontal interval plot: relative lift and delta-method CI per (experiment, arm, metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for name, r in results["experiments"].items():
        for arm, c in r["vs_control"].items():
            for metric_name, colour in (("conversion", "tab:blue"), ("arpu", "tab:orange")):
                d = c[metric_name]["delta"]
                rows.append((f"{name}: {arm} vs {r['control']}\n{metric_name}", d["lift"], d["low"], d["high"], colour, r["srm"]["mismatch"]))
    fig, ax = plt.subplots(figsize=(7, 0.6 * max(len(rows), 2) + 1.2))
    for i, (label, lift, low, high, colour, srm) in enumerate(rows):
        if math.isfinite(lift):
            err = [[lift - low], [high - lift]] if math.isfinite(low) else None
            ax.errorbar(100 * lift, i, xerr=None if err is None else 100 * np.array(err), fmt="o", color="tab:red" if srm else colour, capsize=4)
    ax.axvline(0.0, color="grey", lw=1, ls="--")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"relative lift vs control, % ({round(100 * (1 - results['alpha']))}% CI, delta method)")
    if any(r[5] for r in rows):
        ax.set_title("SAMPLE RATIO MISMATCH: intervals in red are not trustworthy", color="tab:red", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _srm_banner(name: str, srm: dict) -> str:
    bar = "!" * 78
    return (
        f"\n{bar}\n!! SAMPLE RATIO MISMATCH in experiment '{name}': chi2={srm['chi2']:.1f} df={srm['df']:.0f} p={_p(srm['p_value'])}\n"
        f"!! the observed split differs from the configured shares; the lifts are NOT trustworthy\n{bar}\n"
    )


def run(cfg: AnalyzeConfig) -> dict:
    table = read_table(cfg.outcomes)
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise DataError(f"{cfg.outcomes} is not an outcomes table (from `cobra ab outcomes`): missing {', '.join(missing)}")
    df = table.to_pandas()
    if df.empty:
        raise DataError(f"{cfg.outcomes} holds no user")
    ab: ABConfig | None = None
    if cfg.experiments:
        from cobra_scale.ab.router import load_ab_config

        ab = load_ab_config(cfg.experiments)
    conv_col, rev_col = ("conversions", "revenue") if cfg.attribution == "shown" else ("all_conversions", "all_revenue")
    results: dict = {"outcomes": str(cfg.outcomes), "attribution": cfg.attribution, "alpha": cfg.alpha, "experiments": {}}
    for name, group in df.groupby("experiment", sort=True):
        if ab is not None:
            exp = ab.experiment(str(name))
            shares = {a.name: a.share for a in exp.arms}
            control = exp.control
        else:  # no config: equal shares, first arm in name order is the control
            arms = sorted(group["arm"].unique())
            shares = {a: 1.0 / len(arms) for a in arms}
            control = arms[0]
        results["experiments"][str(name)] = analyze_experiment(group, control, shares, conv_col, rev_col, cfg.alpha, cfg.srm_threshold, cfg.bootstrap, cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_lifts(results, out / "lift.png")
    (out / "report.md").write_text(render_markdown(results, cfg))
    (out / "analysis.json").write_text(json.dumps(results, indent=2, default=float))
    save_config(cfg, out)
    summary: dict = {}
    for name, r in results["experiments"].items():
        if r["srm"]["mismatch"]:
            log.warning("SAMPLE RATIO MISMATCH in experiment '%s' (p=%s): lifts not trustworthy", name, _p(r["srm"]["p_value"]))
            print(_srm_banner(name, r["srm"]), file=sys.stderr)
            summary[f"{name} SRM"] = f"MISMATCH (p={_p(r['srm']['p_value'])}) - lifts not trustworthy"
        else:
            summary[f"{name} SRM"] = f"ok (p={_p(r['srm']['p_value'])})"
        for arm, c in r["vs_control"].items():
            for metric_name in ("conversion", "arpu"):
                d = c[metric_name]["delta"]
                summary[f"{name} {arm} {metric_name} lift"] = f"{_pct(d['lift'])} [{_pct(d['low'])}, {_pct(d['high'])}] p={_p(c[metric_name]['p_value'])}"
    summary["report"] = str(out / "report.md")
    return summary
