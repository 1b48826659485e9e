"""The model's hyper-parameters (numbers only; the builder reads nothing else)."""

from __future__ import annotations

from dataclasses import dataclass

from cobra_scale.config import field
from cobra_scale.errors import ConfigError


@dataclass
class CobraConfig:
    """Architecture of a COBRA model."""

    levels: int = field(3, help="sparse-ID code levels L (set from the semantic IDs)")
    codes: int = field(32, help="codes per level K (set from the semantic IDs)")
    d_model: int = field(128, help="width of the decoder (and of the dense item vectors)")
    decoder_layers: int = field(2, help="causal Transformer layers of the decoder (paper: 2)")
    decoder_heads: int = field(4, help="attention heads of the decoder")
    encoder_layers: int = field(1, help="Transformer layers of the item text encoder (paper: 1)")
    encoder_heads: int = field(4, help="attention heads of the text encoder")
    encoder_dim: int = field(128, help="width of the text encoder")
    text_pooling: str = field("cls", help="item vector from the text encoder: cls = its [CLS] output (paper) | mean = mean of its outputs over the tokens")
    text_tokens: int = field(32, help="max tokens of an item text, [CLS] included")
    vocab_size: int = field(30522, help="tokenizer vocabulary (set from the tokenizer)")
    max_items: int = field(21, help="max items in a sequence (history + the predicted one)")
    dropout: float = field(0.1, help="dropout in both Transformers and on embeddings")
    attention_dropout: float = field(0.0, help="dropout on attention weights (0 lets SDPA use its fused CPU/GPU kernels)")
    temperature: float = field(0.07, help="initial temperature of the dense in-batch softmax")
    learn_temperature: bool = field(True, help="train the temperature (as a log-parameter)")
    sparse_weight: float = field(1.0, help="weight of the sparse (code) cross-entropy")
    dense_weight: float = field(1.0, help="weight of the dense (cosine softmax) loss")
    history_dense_weight: float = field(
        0.0,
        help="weight of an auxiliary dense loss from the position before the next item's codes (the history alone, no ID "
        "given), through the same dense head and in-batch softmax; training only, inference unchanged. A vector told "
        "the target's ID can lean on it, since the ID rules out most in-batch negatives; this term keeps the decoder and "
        "the item vectors learning history -> next item as w/o ID does (not in the paper; 0 = off)",
    )
    use_sparse: bool = field(True, help="False = ablation 'w/o ID': no code tokens, dense only")
    use_dense: bool = field(True, help="False = ablation 'w/o Dense': codes only (TIGER-like)")
    prefix_embeddings: bool = field(
        True,
        help="also embed each code together with its prefix (one row per ID node of the trie), tied with the code "
        "heads: a per-ID embedding on the input and per-ID scores on the output",
    )
    prefix_rows: int = field(1 << 16, help="rows per level of the prefix embeddings; deeper tries are hashed into them")
    item_embedding: bool = field(
        False,
        help="add a free per-item embedding (zero-initialised, one row per catalogue item) to the text encoder's vector; "
        "items added after training (cold start) keep their text vector alone. Not in the paper, where the dense vector is text only",
    )
    successor_embedding: bool = field(
        False,
        help="a free per-item row of the most recent history item (zero-initialised, one row per catalogue item) added "
        "to the hidden states that predict the next item's codes and dense vector: a first-order, item-to-item "
        "transition term (as FPMC's), memorised per item instead of through the decoder; a last item added after "
        "training adds nothing. Not in the paper",
    )
    successor_context: int = field(
        1,
        help="successor_embedding: the rows of the last successor_context history items join the next item's hidden "
        "states, each times a learned per-recency weight (starting at 1, 0.3, 0.09, ... from the most recent): the "
        "learned counterpart of an item-to-item count voted by the last few items; 1 = the last item's row alone",
    )
    successor_context_dense: int = field(
        0,
        help="successor_context for the hidden state that predicts the dense vector alone: the rows of its last "
        "successor_context_dense items (with the same recency weights) while the code heads read successor_context; "
        "0 = successor_context (the same rows for every head)",
    )
    repeat_bias: bool = field(
        False,
        help="a learned bias per code level on the logit of a code whose ID prefix (codes 0..level) is that of one of the "
        "user's history items, in training and in beam search: the model learns from the data how much the next item "
        "repeats an ID already in the history (a repeat/explore term, not in the paper; zero-initialised)",
    )
    repeat_positions: int = field(
        1,
        help="repeat_bias: separate offsets for the most recent repeat_positions - 1 history items and one for all older "
        "ones (a code's offset is that of the most recent history item whose ID it extends into); 1 = one offset per level",
    )
    dense_repeat_bias: bool = field(
        False,
        help="a learned offset on the dense softmax's logit of every key that is one of the user's own history items, in "
        "training and (as temperature x offset added to the cosine) in BeamFusion and nearest-neighbour search: the "
        "item-level counterpart of repeat_bias (not in the paper; zero-initialised)",
    )
    dense_repeat_positions: int = field(
        1,
        help="dense_repeat_bias: separate offsets for the most recent dense_repeat_positions - 1 history items and one for "
        "all older ones; 1 = one offset",
    )
    catalogue_items: int = field(0, help="rows of the per-item embeddings (set from the catalogue when item_embedding or successor_embedding is on)")
    constrained_codes: bool = field(
        False,
        help="each level's code softmax is taken over the codes that follow the prefix in the catalogue's ID trie only, "
        "in the sparse loss and in the beam scores (which are then log P(ID) over the catalogue's IDs); the trainer gives "
        "the model the trie (model.code_masks). Off: softmax over all K codes, invalid ones masked at inference only",
    )
    label_smoothing: float = field(
        0.0,
        help="label smoothing of the sparse code cross-entropy (not in the paper): this share of each level's target mass "
        "is spread evenly over the codes the softmax allows (with constrained_codes, the prefix's children only)",
    )

    def __post_init__(self) -> None:
        if self.d_model % self.decoder_heads or self.encoder_dim % self.encoder_heads:
            raise ConfigError("d_model / encoder_dim must be divisible by their head counts")
        if not (self.use_sparse or self.use_dense):
            raise ConfigError("at least one of use_sparse / use_dense must be true")
        if self.text_tokens < 2 or self.max_items < 2:
            raise ConfigError("text_tokens and max_items must be >= 2")
        if self.prefix_rows < 1:
            raise ConfigError("prefix_rows must be >= 1")
        if self.text_pooling not in ("cls", "mean"):
            raise ConfigError("text_pooling must be cls or mean")
        if self.repeat_bias and not self.use_sparse:
            raise ConfigError("model.repeat_bias acts on the sparse IDs: it needs model.use_sparse=true")
        if self.successor_context < 1:
            raise ConfigError("model.successor_context must be >= 1")
        if self.successor_context > 1 and not self.successor_embedding:
            raise ConfigError("model.successor_context > 1 needs model.successor_embedding=true")
        if not 0 <= self.successor_context_dense <= self.successor_context:
            raise ConfigError(
                f"model.successor_context_dense must be between 0 (= successor_context) and successor_context "
                f"({self.successor_context}); got {self.successor_context_dense}"
            )
        if self.repeat_positions < 1:
            raise ConfigError("model.repeat_positions must be >= 1")
        if self.repeat_positions > 1 and not self.repeat_bias:
            raise ConfigError("model.repeat_positions > 1 needs model.repeat_bias=true")
        if self.dense_repeat_bias and not self.use_dense:
            raise ConfigError("model.dense_repeat_bias acts on the dense softmax: it needs model.use_dense=true")
        if self.dense_repeat_positions < 1:
            raise ConfigError("model.dense_repeat_positions must be >= 1")
        if self.dense_repeat_positions > 1 and not self.dense_repeat_bias:
            raise ConfigError("model.dense_repeat_positions > 1 needs model.dense_repeat_bias=true")
        if self.catalogue_items < 0:
            raise ConfigError("catalogue_items must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"model.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.history_dense_weight < 0:
            raise ConfigError("model.history_dense_weight must be >= 0")
        if self.history_dense_weight > 0 and not (self.use_sparse and self.use_dense):
            raise ConfigError("model.history_dense_weight is a second dense loss before the ID: it needs model.use_sparse and model.use_dense")
        if self.temperature <= 0:
            raise ConfigError("temperature must be > 0")
