"""Semantic IDs: item text -> sentence embedding -> residual quantiser -> sparse ID codes.

    embed.py        text embeddings with a real sentence model (local or Ray Data actor pool)
    rqvae.py        RQ-VAE (MLP encoder, L residual codebooks of K codes, decoder) — pure torch
    rkmeans.py      residual k-means with faiss (fast, robust alternative)
    diagnostics.py  code usage, perplexity, bucket sizes, reconstruction error, histogram
    assign.py       `cobra ids`: fit, assign, save; cold-start assignment of new items
"""
