"""Offline evaluation: top-K ranking metrics over full-catalogue rankings.

Kept import-light (no torch at package import) so that ``cobra <command> --help`` stays
fast; import the submodules (``metrics``, ``offline``, ``run_eval``, ``cold_start``) directly.
"""
