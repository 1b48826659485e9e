"""Training: catalogue tensors, batches, the single-process trainer and its config.

The distributed launcher (Ray Train + DeepSpeed) wraps the same training step.
"""
