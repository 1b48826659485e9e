"""Offline evaluation: top-K ranking metrics over full-catalogue rankings."""

from cobra_scale.eval.metrics import MetricAccumulator, metric_names, rank_metrics, topk_with_exclusion

__all__ = ["MetricAccumulator", "metric_names", "rank_metrics", "topk_with_exclusion"]
