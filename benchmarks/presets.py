"""Model presets: every model shape the benchmarks (and the tests, through ``tests/models.py``) build, in one
table, and one builder from a preset to a transformers config, a model and an RMT wrapper.

Models are always built from configs (no downloads). ``PRESETS[name]`` gives the dimensions; ``config(name,
**overrides)`` the transformers config (``overrides`` are config keyword arguments and win over the preset);
``model(name, task)`` the model (``task``: ``"bare"`` for the backbone without a head, ``"lm"``, ``"cls"``,
``"mlm"``); ``rmt(wrapper, backbone, mem, segment)`` a FastRMT or ReferenceRMT around it with the preset
family's special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CLS_ID, SEP_ID, PAD_ID = 101, 102, 0  # BERT's [CLS], [SEP], [PAD] (ids below 103 are never drawn as content)
ENCODERS = ("bert", "roberta")


@dataclass(frozen=True)
class Preset:
    """One model shape. ``ffn=None`` / ``kv_heads=None``: the family's default (4 x hidden / all heads)."""

    family: str  # bert, roberta, gpt2, llama, qwen2, mistral, opt
    layers: int
    hidden: int
    heads: int
    ffn: int | None
    vocab: int
    positions: int = 512  # max_position_embeddings (n_positions for GPT-2)
    kv_heads: int | None = None
    extra: dict = field(default_factory=dict)  # further config keyword arguments

    @property
    def is_encoder(self) -> bool:
        return self.family in ENCODERS

    def segment_size(self, positions: int, mem: int) -> int:
        """Content tokens per segment when a segment's model input has ``positions`` positions: an encoder
        adds [CLS] [MEM]*m [SEP] ... [SEP], a decoder m read and m write memory slots."""
        return positions - mem - 3 if self.is_encoder else positions - 2 * mem


def _gpt2_tiny_ids():
    return {"bos_token_id": 0, "eos_token_id": 0}


PRESETS: dict[str, Preset] = {
    # --- the paper's encoder and the GPU benchmarks' models
    "bert-base": Preset("bert", 12, 768, 12, 3072, 30522),  # BertConfig() defaults
    "bert-base-cased": Preset("bert", 12, 768, 12, 3072, 28996),  # the FLOPs figure's BERT
    "gpt2-small": Preset("gpt2", 12, 768, 12, None, 50257, 1024),  # GPT2Config() defaults
    "llama-1.2b": Preset(
        "llama",
        16,
        2048,
        32,
        8192,
        128256,
        2048,
        kv_heads=8,
        extra=dict(tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID),
    ),
    # --- small CPU models of the benchmarks
    "bert-cpu": Preset("bert", 2, 64, 2, 256, 1000),  # latency / profile on the CPU (128-position segments)
    "bert-micro": Preset("bert", 1, 32, 2, 64, 256),  # latency / profile smoke runs
    "bert-train-tiny": Preset("bert", 2, 64, 2, 128, 1000),  # train's tiny encoder
    "gpt2-cpu": Preset("gpt2", 2, 64, 2, 256, 1000, 128, extra=_gpt2_tiny_ids()),  # profile / segment benchmarks
    "gpt2-checks": Preset("gpt2", 2, 128, 4, None, 8192, extra=_gpt2_tiny_ids()),  # input-checks on the CPU
    "gpt2-4l": Preset("gpt2", 4, 256, 4, None, 50257),  # compare on the CPU
    "gpt2-4l-8k": Preset("gpt2", 4, 256, 4, None, 8192),  # train-memory on the CPU
    "gpt2-small-8k": Preset("gpt2", 12, 768, 12, None, 8192),  # train-memory on a GPU
    "llama-train-tiny": Preset(
        "llama",
        2,
        64,
        4,
        128,
        1000,
        kv_heads=2,
        extra=dict(tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID),
    ),
    # --- the ARMT benchmark's CPU shapes (issue 16's targets: latency-bound and compute-bound)
    "armt-cpu-latency": Preset("llama", 8, 128, 2, 512, 512, kv_heads=1),
    "armt-cpu-compute": Preset("llama", 4, 256, 4, 1024, 512, kv_heads=2),
    # --- the tests' models (tests/models.py): tiny, vocabulary 96, 128 positions
    "gpt2-test": Preset("gpt2", 2, 32, 4, None, 96, 128, extra=_gpt2_tiny_ids()),
    "llama-test": Preset("llama", 2, 32, 4, 64, 96, 128, kv_heads=2, extra=dict(tie_word_embeddings=False)),
    "qwen2-test": Preset("qwen2", 2, 32, 4, 64, 96, 128, kv_heads=2),
    "mistral-test": Preset("mistral", 2, 32, 4, 64, 96, 128, kv_heads=1),
    "bert-test": Preset("bert", 2, 32, 4, 64, 96, 128, extra=dict(pad_token_id=PAD_ID)),
    "roberta-test": Preset("roberta", 2, 32, 4, 64, 96, 160),
}


def _opt(layers: int, hidden: int, heads: int, proj_dim: int | None = None) -> Preset:
    extra = {"word_embed_proj_dim": proj_dim or hidden}
    return Preset("opt", layers, hidden, heads, 4 * hidden, 50272, 2048, extra=extra)


# The OPT family of the FLOPs figure (OPT paper, Table 1; OPT-350M projects its 512-wide embeddings).
PRESETS.update(
    {
        "opt-125m": _opt(12, 768, 12),
        "opt-350m": _opt(24, 1024, 16, proj_dim=512),
        "opt-1.3b": _opt(24, 2048, 32),
        "opt-2.7b": _opt(32, 2560, 32),
        "opt-6.7b": _opt(32, 4096, 32),
        "opt-13b": _opt(40, 5120, 40),
        "opt-30b": _opt(48, 7168, 56),
        "opt-66b": _opt(64, 9216, 72),
        "opt-175b": _opt(96, 12288, 96),
    }
)


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def config(
    name: str, *, max_positions: int | None = None, attn: str | None = "sdpa", dropout: float | None = 0.0, **overrides
):
    """The transformers config of preset ``name``: positions raised to ``max_positions`` (full attention over a
    long input), ``attn`` as ``attn_implementation`` (None: the library's default), every dropout set to
    ``dropout`` (None: the family's defaults); ``overrides`` are config keyword arguments and win."""
    import transformers as tf

    p = preset(name)
    positions = max(p.positions, max_positions or 0)
    kw: dict = {"vocab_size": p.vocab}
    if p.family in ("bert", "roberta"):
        kw.update(
            hidden_size=p.hidden,
            num_hidden_layers=p.layers,
            num_attention_heads=p.heads,
            intermediate_size=p.ffn,
            max_position_embeddings=positions,
        )
        if dropout is not None:
            kw.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    elif p.family == "gpt2":
        kw.update(n_layer=p.layers, n_embd=p.hidden, n_head=p.heads, n_positions=positions)
        if p.ffn is not None:
            kw["n_inner"] = p.ffn
        if dropout is not None:
            kw.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    elif p.family == "opt":
        kw.update(
            hidden_size=p.hidden,
            num_hidden_layers=p.layers,
            num_attention_heads=p.heads,
            ffn_dim=p.ffn,
            max_position_embeddings=positions,
            do_layer_norm_before=name != "opt-350m",
        )
        if dropout is not None:
            kw.update(dropout=dropout, attention_dropout=dropout)
    else:  # llama, qwen2, mistral
        kw.update(
            hidden_size=p.hidden,
            num_hidden_layers=p.layers,
            num_attention_heads=p.heads,
            num_key_value_heads=p.kv_heads or p.heads,
            intermediate_size=p.ffn,
            max_position_embeddings=positions,
        )
    if attn is not None:
        kw["attn_implementation"] = attn
    kw.update(p.extra)
    kw.update(overrides)
    cls = {
        "bert": tf.BertConfig,
        "roberta": tf.RobertaConfig,
        "gpt2": tf.GPT2Config,
        "opt": tf.OPTConfig,
        "llama": tf.LlamaConfig,
        "qwen2": tf.Qwen2Config,
        "mistral": tf.MistralConfig,
    }[p.family]
    return cls(**kw)


_CLASSES = {
    ("bert", "bare"): "BertModel",
    ("bert", "cls"): "BertForSequenceClassification",
    ("bert", "mlm"): "BertForMaskedLM",
    ("roberta", "cls"): "RobertaForSequenceClassification",
    ("gpt2", "lm"): "GPT2LMHeadModel",
    ("opt", "lm"): "OPTForCausalLM",
    ("llama", "lm"): "LlamaForCausalLM",
    ("qwen2", "lm"): "Qwen2ForCausalLM",
    ("mistral", "lm"): "MistralForCausalLM",
}


def model(name: str, task: str = "lm", *, seed: int | None = 0, device=None, **config_kw):
    """A freshly initialised model of preset ``name`` (``torch.manual_seed(seed)`` first, so that every method
    of a benchmark gets the same weights; ``seed=None`` leaves the generator alone). A bare BERT has no pooler.
    ``device`` (e.g. "meta" for counting) is where the weights are created."""
    import contextlib

    import torch
    import transformers as tf

    p = preset(name)
    key = (p.family, task)
    if key not in _CLASSES:
        raise ValueError(
            f"model: preset {name!r} ({p.family}) has no {task!r} model; expected one of "
            f"{sorted(t for f, t in _CLASSES if f == p.family)}"
        )
    cfg = config(name, **config_kw)
    if seed is not None:
        torch.manual_seed(seed)
    cls = getattr(tf, _CLASSES[key])
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return cls(cfg, add_pooling_layer=False) if key == ("bert", "bare") else cls(cfg)


def rmt(wrapper: str, backbone, name: str, mem: int, segment: int, **kwargs):
    """``FastRMT`` (``wrapper="fast"``) or ``ReferenceRMT`` (``"reference"``) around ``backbone`` of preset
    ``name``; encoders get BERT's [CLS] / [SEP] / [PAD] ids."""
    from rmt_fast import FastRMT, ReferenceRMT

    if wrapper not in ("fast", "reference"):
        raise ValueError(f"rmt: wrapper must be 'fast' or 'reference', got {wrapper!r}")
    if preset(name).family == "bert":
        kwargs = {"cls_token_id": CLS_ID, "sep_token_id": SEP_ID, "pad_token_id": PAD_ID, **kwargs}
    return (FastRMT if wrapper == "fast" else ReferenceRMT)(backbone, mem, segment, **kwargs)


def content_ids(batch: int, n: int, vocab: int, seed: int = 0, device=None):
    """(batch, n) random token ids that avoid the special ids (all below 103)."""
    import torch

    ids = torch.randint(CLS_ID + 2, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))
    return ids if device is None else ids.to(device)
