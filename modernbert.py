"""ModernBERT in one file: config, model, every task head, and a strict loader for official checkpoints.

ModernBERT (Warner et al., 2024, "Smarter, Better, Faster, Longer", arXiv:2412.13663) is a BERT-style
encoder rebuilt with what decoders learned since 2018. What makes it different from BERT:

- alternating attention: every third layer is global, the others see only a local window of
  +-64 tokens (`G L L G L L ...`), so long inputs cost O(S * window) on two layers in three;
- rotary position embeddings (RoPE) with two bases: theta = 160000 on global layers, 10000 on local;
- GeGLU feed-forward: Wo(gelu(x Wi_a) * (x Wi_b));
- pre-norm with bias-free LayerNorms everywhere, and no norm before layer 0's attention (the
  embedding norm has just done that job);
- unpadding: padded batches are packed into one stream of real tokens, so no compute is spent on
  padding, and attention runs on the packed stream with sequence boundaries (`cu_seqlens`).

Every number this file computes is checked against the official implementation (Hugging Face
`transformers`, `models/modernbert`) in test_modernbert.py. Class names, attribute names and
`state_dict` keys are the official ones, so checkpoints load both ways.

Reading order: config -> small parts (RoPE, GeGLU, packing, the attention kernels) -> encoder layer
-> model -> heads -> loading and saving.
"""

import functools
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class ModernBertConfig:
    """Defaults are ModernBERT-base. Field names are the official `config.json` names."""

    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152  # GeGLU: Wi projects to 2 * intermediate_size, half of it gates
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_activation: str = "gelu"  # exact erf GELU, not the tanh approximation
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    norm_bias: bool = False  # every LayerNorm is bias-free
    pad_token_id: int = 50283
    bos_token_id: int = 50281
    eos_token_id: int = 50282
    cls_token_id: int = 50281
    sep_token_id: int = 50282
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    local_attention: int = 128  # total width: query i sees key j iff |i - j| <= 64
    global_attn_every_n_layers: int = 3  # layer i is global iff i % 3 == 0: G L L G L L ...
    layer_types: list | None = None  # v5 spelling of the pattern; derived from the line above if None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    embedding_dropout: float = 0.0
    mlp_bias: bool = False
    mlp_dropout: float = 0.0
    decoder_bias: bool = True
    classifier_pooling: str = "cls"  # "cls" (first real token) or "mean" (over real tokens)
    classifier_dropout: float = 0.0
    classifier_bias: bool = False  # bias of head.dense; the classifier itself always has one
    classifier_activation: str = "gelu"
    sparse_prediction: bool = False  # MLM with labels: decode only positions whose label != ignore
    sparse_pred_ignore_index: int = -100
    num_labels: int = 2
    id2label: dict | None = None  # {0: "LABEL_0", ...} when None
    label2id: dict | None = None
    problem_type: str | None = None  # "regression" | "single_label_classification" | "multi_label_classification"
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    tie_word_embeddings: bool = True
    attn_implementation: str | None = None  # "eager" | "sdpa" | "flash_attention_2"; None picks one

    def __post_init__(self):
        if self.layer_types is None:
            n = self.global_attn_every_n_layers
            self.layer_types = ["full_attention" if i % n == 0 else "sliding_attention" for i in range(self.num_hidden_layers)]
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        self.id2label = {int(k): v for k, v in self.id2label.items()}  # JSON keys are strings
        self.num_labels = len(self.id2label)
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        self.validate()

    def validate(self):
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        elif self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} is odd; RoPE rotates pairs of dimensions")
        if self.local_attention <= 0 or self.local_attention % 2:
            problems.append(f"local_attention {self.local_attention} must be a positive even total width (2 x the half-window)")
        for name in ("hidden_activation", "classifier_activation"):
            if getattr(self, name) not in ACTIVATIONS:
                problems.append(f"{name} {getattr(self, name)!r} is not one of {sorted(ACTIVATIONS)}")
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {"full_attention", "sliding_attention"}:
            problems.append(f"layer_types must list {self.num_hidden_layers} of 'full_attention' / 'sliding_attention', got {self.layer_types}")
        if self.classifier_pooling not in ("cls", "mean"):
            problems.append(f"classifier_pooling {self.classifier_pooling!r} must be 'cls' or 'mean'")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            problems.append(f"attn_implementation {self.attn_implementation!r} must be one of {ATTN_IMPLEMENTATIONS}")
        if min(self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.max_position_embeddings) <= 0:
            problems.append("sizes must be positive")
        if problems:
            raise ValueError("Invalid ModernBertConfig: " + "; ".join(problems))

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    def is_global(self, layer_id):
        return self.layer_types[layer_id] == "full_attention"

    @classmethod
    def from_dict(cls, d):
        """Reads a config.json of either official format: v4 (`global_rope_theta`,
        `global_attn_every_n_layers`) or v5 (`layer_types`, `rope_parameters`). Other keys are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        for layer_type, name in (("full_attention", "global_rope_theta"), ("sliding_attention", "local_rope_theta")):
            rope = (d.get("rope_parameters") or {}).get(layer_type)
            if rope:
                if rope.get("rope_type", "default") != "default":
                    raise ValueError(f"rope_type {rope['rope_type']!r} for {layer_type} is not supported: only plain RoPE")
                kwargs[name] = rope["rope_theta"]
        if kwargs.get("id2label"):
            kwargs.pop("num_labels", None)  # the label map decides
        return cls(**kwargs)

    def to_dict(self):
        """config.json in the official format, written in both spellings so transformers 4 and 5 read it."""
        d = asdict(self)
        d.pop("attn_implementation")
        d["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": self.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta},
        }
        d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        d["model_type"] = "modernbert"
        return d


ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa", "flash_attention_2")

# The official names map to these; "gelu" is the exact erf form everywhere in ModernBERT.
ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}

# ----------------------------------------------------------------------------------------------------
# RoPE with two bases. Rotation "rotate_half" (NeoX): the first and second halves of each head pair up.


def rope_tables(theta, head_dim, positions):
    """cos, sin of shape (T, D) for integer positions (T,), always in fp32 (bf16 tables lose the
    phase at positions of a few hundred and beyond)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x * cos + rotate_half(x) * sin for x of shape (T, H, D), computed in fp32 and returned in x's
    dtype. addcmul fuses the multiply-add: one fewer (T, H, D) temporary per call."""
    cos, sin = cos[:, None], sin[:, None]  # (T, 1, D): the same rotation for every head
    xf = x.float()
    return torch.addcmul(xf * cos, rotate_half(xf), sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# GeGLU feed-forward


class ModernBertMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_activation]()
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        # A gated MLP: half of Wi's output, through GELU, scales the other half element by element.
        # Wi holds both input matrices (2 * intermediate_size outputs), so it is one matmul, not two.
        input, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.drop(self.act(input) * gate))


# ----------------------------------------------------------------------------------------------------
# Unpadding. Every per-token operation (embeddings, projections, MLP, norms, heads) runs on the packed
# stream of real tokens only; attention gets the sequence boundaries. A worked example:
#
#   attention_mask [[1, 1, 1, 0],        indices    = [0, 1, 2, 4, 5]  flat positions of real tokens
#                   [1, 1, 0, 0]]   ->   cu_seqlens = [0, 3, 5]        boundaries in the packed stream
#                                        max_seqlen = 3
#   input_ids (2, 4) --unpad--> (5,) --embed, layers--> (5, hidden) --pad--> (2, 4, hidden)
#                                                                            zeros where mask is 0
#
# Positions restart at 0 in each sequence, so a left-padded row and a right-padded row give the same
# numbers. Already-packed input (sequences concatenated, plus cu_seqlens) skips the unpad step.


def unpad(x, indices):
    """(B, S, ...) -> (T, ...): keep the rows at `indices` of the flattened (B * S) grid."""
    return x.flatten(0, 1)[indices]


def pad(x, indices, batch, seqlen):
    """(T, ...) -> (B, S, ...): put packed rows back at `indices`; every other position is zero."""
    out = x.new_zeros(batch * seqlen, *x.shape[1:])
    out[indices] = x
    return out.view(batch, seqlen, *x.shape[1:])


@dataclass
class Packing:
    """Where the real tokens of a batch sit, computed once per forward and shared by every layer."""

    indices: torch.Tensor  # (T,) positions of real tokens in the flattened input grid
    cu_seqlens: torch.Tensor  # (N + 1,) int32 sequence boundaries in the packed stream
    max_seqlen: int
    shape: tuple  # (B, S) of the input grid
    seq_ids: torch.Tensor  # (T,) which sequence each token belongs to
    positions: torch.Tensor  # (T,) position of each token inside its sequence
    cache: dict = field(default_factory=dict)  # masks the kernels build once per forward

    @classmethod
    def from_mask(cls, attention_mask):
        lengths = attention_mask.sum(dim=1)
        indices = attention_mask.flatten().nonzero().squeeze(1)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return cls.from_cu_seqlens(cu_seqlens, indices, attention_mask.shape)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens, indices, shape):
        total = indices.numel()
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq_ids = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths, output_size=total)
        positions = torch.arange(total, device=lengths.device) - cu_seqlens.long()[seq_ids]
        max_seqlen = int(lengths.max()) if len(lengths) else 0
        return cls(indices, cu_seqlens, max_seqlen, tuple(shape), seq_ids, positions)

    @property
    def num_seqs(self):
        return len(self.cu_seqlens) - 1

    def repad(self, x):
        """Packed (T, ...) -> the input's grid (B, S, ...), zeros at padded positions."""
        return pad(x, self.indices, *self.shape)

    def real_mask(self):
        """Boolean (B, S) on the input's grid: True where a real token sits."""
        return self.repad(torch.ones(len(self.indices), dtype=torch.bool, device=self.indices.device))


# ----------------------------------------------------------------------------------------------------
# Attention kernels. All three take packed q, k, v of shape (T, H, D), the Packing, and the half-window
# (None on global layers), and return (T, H, D). `attention_kernel` picks one.
#
# The local band, drawn for window = 2 (ModernBERT: 64), intersected with padding:
#
#        keys ->  0 1 2 3 4 5 .          query i sees key j iff |i - j| <= window
#   query 0       x x x . . . .          and both are real tokens of the same sequence
#         1       x x x x . . .
#         2       x x x x x . .
#         3       . x x x x x .
#         4       . . x x x x .          (5 real tokens, then padding: no column, no row)


def band(query_pos, key_pos, window):
    """Boolean (Q, K): which keys each query may see. window=None is global attention."""
    if window is None:
        return torch.ones(len(query_pos), len(key_pos), dtype=torch.bool, device=query_pos.device)
    return (query_pos[:, None] - key_pos[None, :]).abs() <= window


def eager_attention(q, k, v, packing, window, dropout_p=0.0):
    """The reference: softmax(Q K^T / sqrt(D) + mask) V, written out on a padded (B, H, S, S) grid."""
    B, S, D = packing.num_seqs, packing.max_seqlen, q.shape[-1]
    grid = packing.seq_ids * S + packing.positions  # each token's place in a right-padded (B, S) grid
    q, k, v = (pad(t, grid, B, S).transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    scores = (q @ k.transpose(-2, -1)) * D**-0.5  # (B, H, S, S)
    key_is_real = pad(torch.ones_like(grid, dtype=torch.bool), grid, B, S)  # (B, S)
    pos = torch.arange(S, device=q.device)
    allowed = key_is_real[:, None, None, :] & band(pos, pos, window)  # (B, 1, S, S)
    # A finite minimum, not -inf: a padded query row with no allowed key stays finite (and is dropped).
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return unpad((probs @ v).transpose(1, 2), grid)  # (T, H, D)


def sdpa_attention(q, k, v, packing, window, dropout_p=0.0):
    """torch's scaled_dot_product_attention, without ever building an (S, S) mask.

    SDPA with an explicit (S, S) mask materialises it, saves nothing from the window and keeps SDPA
    off its fused kernels. Instead: global layers run one unmasked call per sequence (no padding, no
    mask), and local layers run blocked sliding-window attention over the packed stream, which costs
    O(T * window) however long the sequences are."""
    if window is not None:
        return local_block_attention(q, k, v, packing, window, dropout_p)
    bounds = packing.cache.get("bounds")
    if bounds is None:  # one host sync per forward, not per layer
        bounds = packing.cache["bounds"] = list(zip(packing.cu_seqlens[:-1].tolist(), packing.cu_seqlens[1:].tolist()))
    out = torch.empty_like(q)
    for start, end in bounds:
        if end > start:
            qs, ks, vs = (t[None, start:end].transpose(1, 2) for t in (q, k, v))  # (1, H, L, D): 4-D takes the fused CPU kernel
            out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout_p)[0].transpose(0, 1)
    return out


def local_block_attention(q, k, v, packing, window, dropout_p=0.0):
    """Sliding-window attention in blocks of `window` queries over the whole packed stream.

    A query in block i sees only keys within +-window, which all lie in blocks i-1, i, i+1: each block
    attends to 3 * window keys instead of S. Sequence boundaries need no special case: a key counts
    only if it belongs to the query's sequence (and inside one sequence, packed distance = position
    distance)."""
    T, H, D = q.shape
    b = window
    n = max(1, -(-T // b))  # number of query blocks (one, empty, when T = 0)
    key = ("local", window)
    if key not in packing.cache:
        ids = F.pad(packing.seq_ids, (b, n * b - T + b), value=-1)  # -1: padding, its own "sequence"
        q_ids = ids[b : b + n * b].view(n, b)  # (n, b)
        k_ids = ids.unfold(0, 3 * b, b)  # (n, 3b): keys of blocks i-1, i, i+1
        in_band = band(torch.arange(b, 2 * b, device=q.device), torch.arange(3 * b, device=q.device), window)
        packing.cache[key] = ((q_ids[:, :, None] == k_ids[:, None, :]) & in_band)[:, None]  # (n, 1, b, 3b)
    mask = packing.cache[key]
    qb = F.pad(q, (0, 0, 0, 0, 0, n * b - T)).view(n, b, H, D).transpose(1, 2)  # (n, H, b, D)
    kb, vb = (F.pad(t, (0, 0, 0, 0, b, n * b - T + b)).unfold(0, 3 * b, b).permute(0, 1, 3, 2) for t in (k, v))  # (n, H, 3b, D)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p)  # (n, H, b, D)
    return out.transpose(1, 2).reshape(n * b, H, D)[:T]


def flash_attention(q, k, v, packing, window, dropout_p=0.0, varlen=None):
    """FlashAttention-2 varlen on the packed stream: no padding, window applied inside the kernel.
    The kernel takes fp16/bf16 only; fp32 inputs are cast to bf16 and back, as the official code does.
    `varlen` is the kernel, found once per forward by `attention_kernel` (looked up here if None)."""
    varlen = varlen or find_flash_kernel(q.device)
    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    w = (-1, -1) if window is None else (window, window)  # inclusive on both sides, like |i - j| <= window
    cu, S = packing.cu_seqlens, packing.max_seqlen
    out = varlen(q, k, v, cu, cu, S, S, dropout_p=dropout_p, softmax_scale=q.shape[-1] ** -0.5, window_size=w)
    return out.to(dtype)


def find_flash_kernel(device):
    """The varlen flash kernel for `device`, with flash_attn's signature, or a clear error."""
    if device.type != "cuda":
        raise RuntimeError(f"attn_implementation='flash_attention_2' needs a CUDA GPU, but the model is on {device}. Use 'sdpa' (or None to choose) on this device.")
    try:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func
    except ImportError:
        pass
    try:  # torch's own copy of the kernel; only releases whose signature has the window can serve
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        if "window_size" in inspect.signature(varlen_attn).parameters:

            def torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, window_size=(-1, -1)):
                if dropout_p:
                    raise RuntimeError("torch's varlen_attn has no dropout: install flash-attn to train with attention dropout")
                return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=softmax_scale, window_size=window_size)

            return torch_varlen
    except ImportError:
        pass
    raise RuntimeError(
        "attn_implementation='flash_attention_2' needs a varlen flash kernel: `pip install flash-attn "
        "--no-build-isolation`, or a torch whose torch.nn.attention.varlen.varlen_attn takes window_size."
    )


KERNELS = {"eager": eager_attention, "sdpa": sdpa_attention, "flash_attention_2": flash_attention}


def attention_kernel(name, device, dtype):
    """The one place a kernel is chosen. None picks flash on a GPU in half precision when a kernel
    is there to be found, sdpa otherwise; a forced name is honoured or refused with the reason."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {name!r} is unknown: use one of {ATTN_IMPLEMENTATIONS}")
    if name is None:
        name = "sdpa"
        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            try:
                find_flash_kernel(device)
                name = "flash_attention_2"
            except RuntimeError:
                pass
    if name == "flash_attention_2":  # raises with what is missing, before any work is done
        return functools.partial(flash_attention, varlen=find_flash_kernel(device))  # no lookup per layer
    return KERNELS[name]


# ----------------------------------------------------------------------------------------------------
# The encoder


class ModernBertEmbeddings(nn.Module):
    """Token embeddings -> LayerNorm -> dropout. No position embeddings: RoPE does that inside attention."""

    def __init__(self, config):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id if 0 <= config.pad_token_id < config.vocab_size else None)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.drop = nn.Dropout(config.embedding_dropout)

    def forward(self, input_ids=None, inputs_embeds=None):
        x = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        return self.drop(self.norm(x))


class ModernBertAttention(nn.Module):
    def __init__(self, config, layer_id):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.window = None if config.is_global(layer_id) else config.local_attention // 2
        self.dropout = config.attention_dropout
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.out_drop = nn.Dropout(config.attention_dropout)

    def forward(self, x, rope, packing, kernel):  # x: (T, hidden)
        # One matmul for all three projections; the output is laid out [Q | K | V], each (H, D).
        q, k, v = self.Wqkv(x).view(len(x), 3, self.num_heads, self.head_dim).unbind(1)  # (T, H, D) each
        # Position enters only here: rotating q and k makes q . k depend on their distance alone.
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = kernel(q, k, v, packing, self.window, self.dropout if self.training else 0.0)
        return self.out_drop(self.Wo(out.flatten(1)))  # (T, H * D)


class ModernBertEncoderLayer(nn.Module):
    def __init__(self, config, layer_id):
        super().__init__()
        # Layer 0 has no attn_norm: the embedding norm just normalised its input (no checkpoint key either).
        self.attn_norm = nn.Identity() if layer_id == 0 else nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.attn = ModernBertAttention(config, layer_id)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.mlp = ModernBertMLP(config)

    def forward(self, x, rope, packing, kernel):  # pre-norm: the residual stream itself is never normed
        x = x + self.attn(self.attn_norm(x), rope, packing, kernel)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class ModernBertOutput:
    """The official output attributes; a head fills the ones it has, the rest stay None."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None


class ModernBertPreTrainedModel(nn.Module):
    """What every class shares: weight init and (at the bottom of the file) loading and saving."""

    def init_weights(self, only=None):
        """The official init: truncated normals, smaller for output projections, zero biases,
        LayerNorm weights 1. `only`: the names of the modules to initialise (the loader's fresh heads)."""
        c = self.config
        std_in, std_out = c.initializer_range, c.initializer_range / math.sqrt(2.0 * c.num_hidden_layers)

        def trunc(linear, std):
            nn.init.trunc_normal_(linear.weight, 0.0, std, -c.initializer_cutoff_factor * std, c.initializer_cutoff_factor * std)
            if getattr(linear, "bias", None) is not None:
                nn.init.zeros_(linear.bias)

        for name, m in self.named_modules():
            if only is not None and name not in only:
                continue
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                trunc(m, std_in)
            elif isinstance(m, nn.Linear):
                last = name.rsplit(".", 1)[-1]
                std = {"Wqkv": std_in, "Wi": std_in, "classifier": c.hidden_size**-0.5}.get(last, std_out)
                if last != "decoder" or not c.tie_word_embeddings:
                    trunc(m, std)
                elif m.bias is not None:
                    nn.init.zeros_(m.bias)

    def tie_weights(self):
        """Only the masked-LM class ties weights (its decoder to the embeddings)."""

    @classmethod
    def from_pretrained(cls, folder, attn_implementation=None, dtype=None, device=None, **config_overrides):
        """Load an official checkpoint folder (config.json + safetensors) into this class, strictly:
        a task checkpoint or a bare backbone, every shape checked, a missing backbone weight an error.
        What was dropped (another task's head) or initialised fresh (a new classifier) is reported in
        `model.load_report` and a warning. `config_overrides` change the config, e.g. num_labels=3.
        The code is at the bottom of the file, `load_checkpoint`."""
        return load_checkpoint(cls, folder, attn_implementation, dtype, device, **config_overrides)

    def save_pretrained(self, folder):
        """Write config.json + model.safetensors in the official format (`save_checkpoint`, below)."""
        save_checkpoint(self, folder)

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def dtype(self):
        return next(self.parameters()).dtype


# The stack, for ModernBERT-base (22 layers; global every 3rd, starting at layer 0):
#
#   tokens -> embeddings -> [G] L L [G] L L [G] L L [G] L L [G] L L [G] L L [G] L L [G] -> final_norm
#                            0  1 2  3  4 5  6                                        21
#   G: every token sees its whole sequence, RoPE theta 160000 (long range, slowly turning phases)
#   L: every token sees +-64 neighbours,   RoPE theta  10000 (short range, fast phases)


class ModernBertModel(ModernBertPreTrainedModel):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList(ModernBertEncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, cu_seqlens=None, output_hidden_states=False):
        """input_ids (B, S) with attention_mask (B, S) of 0/1 (None: all real), or already-packed input:
        input_ids (1, T) holding sequences back to back, with cu_seqlens (N + 1,) their boundaries.
        Returns last_hidden_state (B, S, hidden), zeros at padded positions, and with
        output_hidden_states the embedding output and each layer's output, the last one after final_norm."""
        hidden, packing, states = self.encode(input_ids, attention_mask, inputs_embeds, cu_seqlens, output_hidden_states)
        return ModernBertOutput(
            last_hidden_state=packing.repad(hidden),
            hidden_states=tuple(packing.repad(h) for h in states) if output_hidden_states else None,
        )

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, cu_seqlens=None, output_hidden_states=False):
        """The packed forward every head builds on: returns hidden (T, hidden) of the real tokens only,
        the Packing that says where they came from, and the per-layer states if asked for."""
        packing = self.pack(input_ids, attention_mask, inputs_embeds, cu_seqlens)
        if inputs_embeds is None:
            x = self.embeddings(input_ids=unpad(input_ids, packing.indices))  # (T, hidden)
        else:
            x = self.embeddings(inputs_embeds=unpad(inputs_embeds, packing.indices))
        # Chosen per forward, so config.attn_implementation can change between calls.
        kernel = attention_kernel(self.config.attn_implementation, x.device, x.dtype)
        ropes = {  # one cos/sin table per base, shared by all layers of that type
            t: rope_tables(theta, self.config.head_dim, packing.positions)
            for t, theta in (("full_attention", self.config.global_rope_theta), ("sliding_attention", self.config.local_rope_theta))
        }
        states = [x] if output_hidden_states else None  # kept only when asked: 23 x (T, hidden) floats
        for layer, layer_type in zip(self.layers, self.config.layer_types):
            x = layer(x, ropes[layer_type], packing, kernel)
            if states is not None:
                states.append(x)
        x = self.final_norm(x)
        if states is not None:
            states[-1] = x  # as transformers 5: the last hidden state is the normed one
        return x, packing, states

    def pack(self, input_ids, attention_mask, inputs_embeds, cu_seqlens):
        """Checks the inputs and works out the Packing; a clear error for anything malformed."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        x = input_ids if input_ids is not None else inputs_embeds
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
                raise TypeError(f"input_ids must be an integer tensor of token ids, got {getattr(input_ids, 'dtype', type(input_ids))}.")
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}.")
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must have shape (batch, seq_len, {self.config.hidden_size}), got {tuple(inputs_embeds.shape)}.")
        B, S = x.shape[:2]
        if B == 0 or S == 0:
            raise ValueError(f"Empty batch: input shape {tuple(x.shape)}. Pass at least one sequence of at least one token.")
        if input_ids is not None:
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}) (the vocabulary), got values in [{low}, {high}]. Was the text tokenized with this model's tokenizer?")
        if cu_seqlens is not None:
            if attention_mask is not None or B != 1:
                raise ValueError("Packed input is input_ids of shape (1, T) with cu_seqlens and no attention_mask.")
            cu = torch.as_tensor(cu_seqlens, device=x.device).to(torch.int32)
            if cu.dim() != 1 or len(cu) < 2 or int(cu[0]) != 0 or int(cu[-1]) != S or bool((cu[1:] < cu[:-1]).any()):
                raise ValueError(f"cu_seqlens must rise from 0 to the packed length {S}, got {cu.tolist()}.")
            packing = Packing.from_cu_seqlens(cu, torch.arange(S, device=x.device), (1, S))
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, S, dtype=torch.long, device=x.device)
            if attention_mask.shape != (B, S):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but the input has (batch, seq_len) = {(B, S)}.")
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token).")
            packing = Packing.from_mask(attention_mask.to(device=x.device, dtype=torch.long))
        if packing.max_seqlen > self.config.max_position_embeddings:
            raise ValueError(f"A sequence has {packing.max_seqlen} tokens, more than max_position_embeddings = {self.config.max_position_embeddings}. Truncate it or split it into windows.")
        return packing


# ----------------------------------------------------------------------------------------------------
# Task heads. All share the pretrained prediction head (dense -> GELU -> norm) and run on packed tokens.


class ModernBertPredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.act = ACTIVATIONS[config.classifier_activation]()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

    def forward(self, x):
        return self.norm(self.act(self.dense(x)))


def check_labels(labels, shape, name="labels"):
    if labels is not None and tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(labels.shape)}, expected {tuple(shape)}.")


def packed_token_labels(labels, packing, ignore_index=-100):
    """Token labels (B, S) -> (T,) for the real tokens; a label on a padded position is an error,
    since that position has no output to score."""
    check_labels(labels, packing.shape)
    if bool((labels[~packing.real_mask().to(labels.device)] != ignore_index).any()):
        raise ValueError(f"labels at padded positions must be {ignore_index} (ignored): those positions have no output.")
    return unpad(labels, packing.indices)


def pool(hidden, packing, how):
    """One vector per sequence: 'cls' takes its first real token, 'mean' averages its real tokens."""
    lengths = (packing.cu_seqlens[1:] - packing.cu_seqlens[:-1]).long()
    if bool((lengths == 0).any()):
        raise ValueError(f"Row {int((lengths == 0).nonzero()[0])} of attention_mask is all zeros: there is nothing to classify. Drop empty rows.")
    if how == "cls":  # the first token of each sequence in the packed stream: [CLS], wherever padding was
        return hidden[packing.cu_seqlens[:-1].long()]
    sums = hidden.new_zeros(packing.num_seqs, hidden.shape[-1]).index_add_(0, packing.seq_ids, hidden)
    return sums / lengths[:, None].to(hidden.dtype)


def repad_all(states, packing):
    """The per-layer hidden states, if asked for, back on the input's grid."""
    return None if states is None else tuple(packing.repad(h) for h in states)


class ModernBertForMaskedLM(ModernBertPreTrainedModel):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = ModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self):
        """One matrix reads and writes tokens: the decoder's weight is the embeddings' (stored once)."""
        if self.config.tie_word_embeddings:
            self.decoder.weight = self.model.embeddings.tok_embeddings.weight

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, cu_seqlens=None, output_hidden_states=False):
        """logits (B, S, vocab), zeros at padded positions. With config.sparse_prediction and labels,
        only positions whose label is not the ignore index are decoded: logits (N_masked, vocab)."""
        hidden, packing, states = self.model.encode(input_ids, attention_mask, inputs_embeds, cu_seqlens, output_hidden_states)
        sparse = self.config.sparse_prediction and labels is not None
        ignore = self.config.sparse_pred_ignore_index if sparse else -100
        if labels is not None:
            labels = packed_token_labels(labels, packing, ignore)  # (T,)
        if sparse:  # skip the vocabulary-wide matmul for the tokens nobody asked about
            keep = labels != ignore
            hidden, labels = hidden[keep], labels[keep]
        logits = self.decoder(self.head(hidden))  # (T or N_masked, vocab)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels, ignore_index=ignore)
        return ModernBertOutput(loss=loss, logits=logits if sparse else packing.repad(logits), hidden_states=repad_all(states, packing))


def sequence_classification_loss(logits, labels, config):
    """Regression for one label, cross-entropy for integer labels, BCE for float multi-labels."""
    problem = config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype)) if config.num_labels == 1 else F.mse_loss(logits, labels)
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise ValueError(f"problem_type {problem!r} is unknown")


class ModernBertWithClassifier(ModernBertPreTrainedModel):
    """What the four classifying heads share: backbone -> head -> dropout -> classifier (with bias)."""

    def __init__(self, config, num_outputs):
        super().__init__()
        self.config = config
        self.model = ModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        self.drop = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, num_outputs)
        self.init_weights()


class ModernBertForSequenceClassification(ModernBertWithClassifier):
    def __init__(self, config):
        super().__init__(config, num_outputs=config.num_labels)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, cu_seqlens=None, output_hidden_states=False):
        """logits (N, num_labels), one row per sequence. Pooling happens before the head."""
        hidden, packing, states = self.model.encode(input_ids, attention_mask, inputs_embeds, cu_seqlens, output_hidden_states)
        logits = self.classifier(self.drop(self.head(pool(hidden, packing, self.config.classifier_pooling))))
        loss = None
        if labels is not None:
            if labels.shape[0] != logits.shape[0]:
                raise ValueError(f"labels has {labels.shape[0]} rows for {logits.shape[0]} sequences.")
            loss = sequence_classification_loss(logits, labels, self.config)
        return ModernBertOutput(loss=loss, logits=logits, hidden_states=repad_all(states, packing))


class ModernBertForTokenClassification(ModernBertWithClassifier):
    def __init__(self, config):
        super().__init__(config, num_outputs=config.num_labels)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, cu_seqlens=None, output_hidden_states=False):
        """logits (B, S, num_labels), zeros at padded positions; loss ignores label -100."""
        hidden, packing, states = self.model.encode(input_ids, attention_mask, inputs_embeds, cu_seqlens, output_hidden_states)
        logits = self.classifier(self.drop(self.head(hidden)))  # (T, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), packed_token_labels(labels, packing))
        return ModernBertOutput(loss=loss, logits=packing.repad(logits), hidden_states=repad_all(states, packing))


class ModernBertForQuestionAnswering(ModernBertWithClassifier):
    def __init__(self, config):
        super().__init__(config, num_outputs=config.num_labels)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, start_positions=None, end_positions=None, cu_seqlens=None, output_hidden_states=False):
        """start_logits, end_logits (B, S), zeros at padded positions. The loss is the mean of the start
        and end cross-entropies over real tokens; positions outside [0, S) are ignored, as officially."""
        if self.config.num_labels != 2:
            raise ValueError(f"Question answering needs num_labels = 2 (start, end), the config has {self.config.num_labels}.")
        hidden, packing, states = self.model.encode(input_ids, attention_mask, inputs_embeds, cu_seqlens, output_hidden_states)
        logits = packing.repad(self.classifier(self.drop(self.head(hidden))))  # (B, S, 2)
        start_logits, end_logits = logits.unbind(dim=-1)
        loss = None
        if (start_positions is None) != (end_positions is None):
            raise ValueError("Pass both start_positions and end_positions, or neither.")
        if start_positions is not None:
            B, S = packing.shape
            real = packing.real_mask()  # (B, S)
            losses = []
            for name, lg, positions in (("start_positions", start_logits, start_positions), ("end_positions", end_logits, end_positions)):
                check_labels(positions.view(-1) if positions.dim() == 2 and positions.shape[1] == 1 else positions, (B,), name)
                lg = lg.float().masked_fill(~real, torch.finfo(torch.float32).min)  # padding is never an answer
                losses.append(F.cross_entropy(lg, positions.view(-1).clamp(0, S), ignore_index=S))
            loss = (losses[0] + losses[1]) / 2
        return ModernBertOutput(loss=loss, start_logits=start_logits.contiguous(), end_logits=end_logits.contiguous(), hidden_states=repad_all(states, packing))


class ModernBertForMultipleChoice(ModernBertWithClassifier):
    def __init__(self, config):
        super().__init__(config, num_outputs=1)  # one score per choice

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_hidden_states=False):
        """input_ids (B, C, S), one row per choice; logits (B, C). 'cls' pools each choice's first real token."""
        x = input_ids if input_ids is not None else inputs_embeds
        if x is None or x.dim() != (3 if input_ids is not None else 4):
            raise ValueError(f"Multiple choice takes input_ids of shape (batch, num_choices, seq_len), got {None if x is None else tuple(x.shape)}.")
        B, C, S = x.shape[:3]
        if attention_mask is not None and tuple(attention_mask.shape) != (B, C, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, C, S)}.")
        flat = lambda t: None if t is None else t.reshape(B * C, *t.shape[2:])  # noqa: E731  (B, C, S, ...) -> (B*C, S, ...)
        hidden, packing, states = self.model.encode(flat(input_ids), flat(attention_mask), flat(inputs_embeds), None, output_hidden_states)
        logits = self.classifier(self.drop(self.head(pool(hidden, packing, self.config.classifier_pooling)))).view(B, C)
        loss = None
        if labels is not None:
            check_labels(labels, (B,))
            loss = F.cross_entropy(logits, labels)
        return ModernBertOutput(loss=loss, logits=logits, hidden_states=repad_all(states, packing))


# ----------------------------------------------------------------------------------------------------
# Loading and saving official checkpoints (config.json + model.safetensors, or sharded with an index).


def read_safetensors(folder):
    """All tensors of a checkpoint folder, safetensors only: a pickle can run code, so none is opened."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"No checkpoint folder at {folder!r}.")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    elif any(name.endswith((".bin", ".pt", ".pth")) for name in os.listdir(folder)):
        raise ValueError(
            f"{folder!r} holds only pickled weights (pytorch_model.bin). Only safetensors are read, since "
            "unpickling can run arbitrary code. Convert once where you trust the file: "
            "`transformers.AutoModel.from_pretrained(folder).save_pretrained(folder)` writes model.safetensors."
        )
    else:
        raise FileNotFoundError(f"{folder!r} has no model.safetensors or model.safetensors.index.json.")
    tensors = {}
    for name in files:
        path = os.path.join(folder, name)
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"Could not read {path}: the file is truncated or corrupt ({e}). Download it again.") from e
    return tensors


BACKBONE_PARTS = ("embeddings", "layers", "final_norm")


def checkpoint_key(key, prefix):
    """A checkpoint key -> this class's key. Task checkpoints keep the backbone under "model.", bare
    backbones have no prefix; either way it lands under `prefix` ("model." in task classes, "" in
    ModernBertModel). Head keys (head., decoder., classifier.) keep their names."""
    base = key[len("model.") :] if key.startswith("model.") else key
    return prefix + base if base.split(".")[0] in BACKBONE_PARTS else key


def load_checkpoint(cls, folder, attn_implementation=None, dtype=None, device=None, **config_overrides):
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"No checkpoint at {folder!r}: " + ("it has no config.json." if os.path.isdir(folder) else "no such folder."))
    with open(config_path) as f:
        d = json.load(f)
    if "num_labels" in config_overrides:  # a new label count replaces the checkpoint's label map
        d.pop("id2label", None), d.pop("label2id", None)
    d.update(config_overrides)
    d["attn_implementation"] = attn_implementation
    config = ModernBertConfig.from_dict(d)
    with torch.device("meta"):  # shapes only: no memory, and no random init of what the checkpoint overwrites
        model = cls(config)
    own = model.state_dict()
    prefix = "" if cls is ModernBertModel else "model."
    tensors = {checkpoint_key(k, prefix): v for k, v in read_safetensors(folder).items()}
    # Walk our own keys, not the checkpoint's: every weight we need is accounted for, one way or another.

    report = {"dropped": sorted(set(tensors) - set(own)), "initialised": [], "tied": []}
    full = {}
    for k, mine in own.items():
        if k in tensors:
            if tensors[k].shape != mine.shape:
                raise ValueError(f"Checkpoint weight {k} has shape {tuple(tensors[k].shape)}, but the config needs {tuple(mine.shape)}. Does config.json belong to these weights?")
            full[k] = tensors[k]
        elif k == "decoder.weight" and config.tie_word_embeddings:
            full[k] = full[prefix + "embeddings.tok_embeddings.weight"]  # tied: stored once, as the embeddings
            report["tied"].append(k)
        elif k.removeprefix(prefix).split(".")[0] in BACKBONE_PARTS:
            raise ValueError(f"Checkpoint in {folder!r} lacks backbone weight {k!r}: refusing to run a half-loaded model.")
        else:
            report["initialised"].append(k)  # a head this checkpoint does not have (a new classifier)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty made a separate tensor for each name
    model.init_weights(only={k.rsplit(".", 1)[0] for k in report["initialised"]})  # the official init, fresh heads only
    fresh = model.state_dict()
    full.update({k: fresh[k] for k in report["initialised"]})
    model.load_state_dict(full, strict=True)
    if report["dropped"] or report["initialised"]:
        warnings.warn(f"{cls.__name__} from {folder}: dropped {report['dropped'] or 'nothing'}; initialised fresh {report['initialised'] or 'nothing'}.", stacklevel=3)
    model.load_report = report
    return model.to(device=device, dtype=dtype).eval()


def save_checkpoint(model, folder):
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("decoder.weight", None)  # official checkpoints omit the tied copy
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
