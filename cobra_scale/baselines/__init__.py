"""Baselines measured on the same splits and metrics as COBRA (SASRec with full-softmax CE)."""
