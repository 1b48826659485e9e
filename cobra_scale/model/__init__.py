"""The COBRA model: item text encoder, cascaded sparse-dense decoder, coarse-to-fine inference.

Pure torch: nothing here imports ray or deepspeed.

    config.py        CobraConfig (every field commented)
    text_encoder.py  Transformer encoder over an item's text with a leading [CLS] -> dense vector
    decoder.py       causal Transformer blocks with a KV cache
    cobra.py         CobraModel: interleaved [codes, dense] sequence, sparse + dense losses
    beam.py          constrained beam search over code levels + BeamFusion
"""
