"""Retrieval: item indexes keyed by sparse ID and the recommender that runs inference modes.

    exact.py        in-memory exact search inside IDs (and over all items)
    recommender.py  history -> top-K items: COBRA (BeamFusion), w/o BeamFusion, dense-only, sparse-only
"""
