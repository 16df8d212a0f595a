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
`transformers`, `models/modernbert`) in test_modernbert.py, but for the differences README.md lists as made on
purpose, each pinned by a test (padding never reaches an output, a loss or `cls` pooling; losses are fp32). Class
names, attribute names and `state_dict` keys are the official ones, so checkpoints load both ways.

Reading order: config -> RoPE, GeGLU, packing, attention -> encoder layer -> model -> heads.
Below the PLUMBING banner (outputs, files, RoPE scaling, kernels, init, tracing, hub, checks) a first reading may stop.
"""

import fnmatch
import functools
import inspect
import json
import math
import os
import shutil
import tempfile
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------------
# Config

# The two layer types, by their official names, and the config field that holds each one's RoPE base.
ROPE_THETA_FIELDS = {"full_attention": "global_rope_theta", "sliding_attention": "local_rope_theta"}
LAYER_TYPES = tuple(ROPE_THETA_FIELDS)  # global, local
ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa", "flash_attention_2", "flex_attention")
# The official names map to these; "gelu" is the exact erf form everywhere in ModernBERT.
ACTIVATIONS = {"gelu": nn.GELU, "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU}


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
    pad_token_id: int | None = 50283  # None: no padding row in the embeddings
    bos_token_id: int | None = 50281
    eos_token_id: int | list | None = 50282
    cls_token_id: int | None = 50281
    sep_token_id: int | None = 50282
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    rope_parameters: dict | None = None  # RoPE scaling per layer type (long context: "RoPE scaling", below the banner)
    local_attention: int = 128  # total width: query i sees key j iff |i - j| <= 64, the half-window
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
    problem_type: str | None = None  # "regression", "single_label_classification" or "multi_label_classification"
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    tie_word_embeddings: bool = True
    attn_implementation: str | None = None  # one of ATTN_IMPLEMENTATIONS; None picks (see attention_kernels)

    def __post_init__(self):
        check_config_types(self)  # before anything below computes with a value: "768" and True are no sizes
        every = self.global_attn_every_n_layers
        if self.layer_types is None and every >= 1:  # v4 configs: the pattern from global_attn_every_n_layers
            self.layer_types = [
                "full_attention" if i % every == 0 else "sliding_attention" for i in range(self.num_hidden_layers)
            ]
        agree_labels(self)  # num_labels, id2label and label2id tell one story, as in transformers
        normalize_rope(self)
        check_config(self)

    def __setattr__(self, name, value):  # config.num_labels = 3 after it is made, as in transformers: new labels
        relabel = name == "num_labels" and self.id2label is not None and len(self.id2label) != value
        super().__setattr__(name, value)
        if relabel:
            agree_labels(self, fresh=True)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def half_window(self):  # local layers: query i sees key j iff |i - j| <= half_window
        return self.local_attention // 2

    def is_global(self, layer_id):
        return self.layer_types[layer_id] == "full_attention"

    def rope_theta(self, layer_type):
        return getattr(self, ROPE_THETA_FIELDS[layer_type])

    @classmethod
    def from_dict(cls, d):  # a config.json of either official format
        return config_from_dict(cls, d)

    @classmethod
    def from_pretrained(cls, name_or_folder, revision=None, **download):  # a checkpoint's config.json
        folder = checkpoint_folder(name_or_folder, revision, **download)
        return cls.from_dict(read_json_file(os.path.join(folder, "config.json")))

    def to_dict(self):  # config.json in the official format
        return config_to_dict(self)


# ----------------------------------------------------------------------------------------------------
# RoPE with two bases. Rotation "rotate_half" (NeoX): the first and second halves of each head pair up.


def rope_frequencies(config, layer_type):
    """inv_freq (D/2,) = 1 / theta^(2i/D), each pair of dimensions turning at its own rate, and the factor that scales
    cos and sin (1 here). Long-context checkpoints stretch both: `scaled_frequencies`, below the banner."""
    theta, dim, rope = config.rope_theta(layer_type), config.head_dim, config.rope_parameters[layer_type]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    return (inv_freq, 1.0) if rope["rope_type"] == "default" else scaled_frequencies(inv_freq, rope, theta, config)


def rope_tables(inv_freq, attention_factor, positions):
    """cos, sin of shape (T, D) for integer positions (T,), always in fp32 (bf16 tables lose the phase at positions
    of a few hundred and beyond)."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x * cos + rotate_half(x) * sin for x of shape (T, ..., D), computed in fp32 (the fp32 tables promote
    every product, so x needs no fp32 copy) and returned in x's dtype."""
    cos, sin = (t.view(t.shape[0], *[1] * (x.dim() - 2), t.shape[-1]) for t in (cos, sin))  # same for every head
    return torch.addcmul(x * cos, rotate_half(x), sin).to(x.dtype)  # addcmul: one temporary fewer


# ----------------------------------------------------------------------------------------------------
# GeGLU feed-forward


class ModernBertMLP(nn.Module):
    init_roles = {"Wi": "input", "Wo": "output"}  # how init_weights scales each weight

    def __init__(self, config):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_activation]()
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        # Gated: half of Wi's output, through GELU, scales the other half. Wi holds both halves: one matmul, not two.
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
# numbers. Already-packed input (sequences back to back, as transformers' DataCollatorWithFlattening
# makes it) skips the unpad step: its boundaries come as cu_seqlens or as position_ids restarting at 0.


def unpad(x, indices):
    """(B, S, ...) -> (T, ...): keep the rows at `indices` of the flattened (B * S) input."""
    return x.flatten(0, 1)[indices]


def pad(x, indices, batch, seqlen):
    """(T, ...) -> (B, S, ...): put packed rows back at `indices`; every other position is zero."""
    out = x.new_zeros(batch * seqlen, *x.shape[1:])
    out[indices] = x
    return out.view(batch, seqlen, *x.shape[1:])


def cu_seqlens_from_lengths(lengths):
    """Sequence lengths (N,) -> cu_seqlens (N + 1,) int32: where each sequence starts in the packed stream, then T."""
    return F.pad(torch.as_tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)


@dataclass
class Packing:
    """Where the tokens of a batch sit, worked out once per forward and shared by every layer."""

    indices: torch.Tensor  # (T,) each token's place in the flattened (B * S) input
    cu_seqlens: torch.Tensor  # (N + 1,) int32 sequence boundaries in the packed stream
    max_seqlen: int
    input_shape: tuple  # (B, S) of the input, padding where it was
    is_real: torch.Tensor | None = None  # (T,) bool; None: all True (False only where keeps_padding)
    equal_lengths: bool = False  # all N sequences have max_seqlen tokens: global attention needs no key mask
    keeps_padding: bool = False  # a traced batch (pack_for_tracing): padding rides along as tokens not real
    seq_ids: torch.Tensor | None = None  # (T,) which sequence each token belongs to; None: from cu_seqlens
    positions: torch.Tensor = field(init=False)  # (T,) position inside its sequence: 0, 1, 2, ...
    padded_seq_index: torch.Tensor = field(init=False)  # (T,) slot in (N, max_seqlen): a row a sequence, right-padded

    def __post_init__(self):
        # (x.shape[0], not len(x): len() must return a plain int, which would fix the size of a traced graph)
        T, cu = self.indices.shape[0], self.cu_seqlens.long()
        if self.seq_ids is None:  # sequence i's tokens are numbered i
            numbers = torch.arange(cu.shape[0] - 1, device=cu.device)
            self.seq_ids = torch.repeat_interleave(numbers, cu.diff(), output_size=T)
        self.positions = torch.arange(T, device=cu.device) - cu[self.seq_ids]
        self.padded_seq_index = self.seq_ids * self.max_seqlen + self.positions
        if self.is_real is None:
            self.is_real = torch.ones(T, dtype=torch.bool, device=cu.device)

    @classmethod
    def from_mask(cls, attention_mask):  # the usual door: a padded batch (pack_inputs has the others)
        lengths = attention_mask.sum(dim=1)
        indices = attention_mask.flatten().nonzero().squeeze(1)
        longest, equal = longest_length(lengths)
        cu_seqlens = cu_seqlens_from_lengths(lengths)
        return cls(indices, cu_seqlens, longest, tuple(attention_mask.shape), equal_lengths=equal)

    @property
    def num_seqs(self):
        return self.cu_seqlens.shape[0] - 1

    def to_input_shape(self, x):
        """Packed (T, ...) -> the input's shape (B, S, ...), zeros at padded positions."""
        if self.keeps_padding:
            x = x.masked_fill(~self.is_real.view(-1, *[1] * (x.dim() - 1)), 0)
        return pad(x, self.indices, *self.input_shape)

    def attention_mask(self):
        """Boolean (B, S), the input's shape: True where a real token sits."""
        return self.to_input_shape(self.is_real)


# ----------------------------------------------------------------------------------------------------
# Attention. One rule: query i sees key j iff both are real tokens of the same sequence and, on local
# layers, |i - j| <= the half-window. Each kernel computes it from q, k, v of shape (T, H, D), the Packing,
# and the half-window (None on global layers), and returns (T, H, D).
#
# The local band, drawn for a half-window of 2 (ModernBERT: 64), intersected with padding:
#
#        keys ->  0 1 2 3 4 5 .
#   query 0       x x x . . . .
#         1       x x x x . . .
#         2       x x x x x . .
#         3       . x x x x x .
#         4       . . x x x x .          (5 real tokens, then padding: no column, no row)


def band(query_pos, key_pos, half_window):
    """Boolean (..., Q, K): which keys each query may see, |i - j| <= half_window."""
    return (query_pos[..., :, None] - key_pos[..., None, :]).abs() <= half_window


def eager_attention(q, k, v, packing, half_window, dropout_p=0.0):
    """The reference: softmax(Q K^T / sqrt(D) + mask) V, written out on a padded (N, H, S, S) grid."""
    N, S, D = packing.num_seqs, packing.max_seqlen, q.shape[-1]
    q, k, v = (pad(t, packing.padded_seq_index, N, S).transpose(1, 2) for t in (q, k, v))  # (N, H, S, D)
    scores = (q @ k.transpose(-2, -1)) * D**-0.5  # (N, H, S, S)
    allowed = pad(packing.is_real, packing.padded_seq_index, N, S)[:, None, None, :]  # (N, 1, 1, S): real keys only
    if half_window is not None:
        pos = pad(packing.positions, packing.padded_seq_index, N, S)[:, None]  # (N, 1, S)
        allowed = allowed & band(pos, pos, half_window)  # (N, 1, S, S)
    # A finite minimum, not -inf: a padded query row with no allowed key stays finite (and is dropped).
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return unpad((probs @ v).transpose(1, 2), packing.padded_seq_index)  # (T, H, D)


def sdpa_attention(q, k, v, packing, half_window, dropout_p=0.0):
    """torch's scaled_dot_product_attention, never with an (S, S) mask (materialised, it saves nothing from the
    window and keeps SDPA off its fused kernels). Local layers: blocked sliding-window attention, O(T * window).
    Global layers: one call on the padded (N, S) grid, a key mask hiding the padding (a CPU: sdpa_per_sequence)."""
    if half_window is not None:
        return local_block_attention(q, k, v, packing, half_window, dropout_p)
    N, S = packing.num_seqs, packing.max_seqlen
    qg, kg, vg = (pad(t, packing.padded_seq_index, N, S).transpose(1, 2) for t in (q, k, v))  # (N, H, S, D)
    real_keys = pad(packing.is_real, packing.padded_seq_index, N, S)[:, None, None, :]  # (N, 1, 1, S)
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=real_keys, dropout_p=dropout_p)
    return unpad(out.transpose(1, 2), packing.padded_seq_index)


def local_block_attention(q, k, v, packing, half_window, dropout_p=0.0):
    """Sliding-window attention in blocks of `half_window` queries over the whole packed stream.

    A query in block i sees only keys within +-half_window, which all lie in blocks i-1, i, i+1: each
    block attends to 3 * half_window keys instead of S. Sequence boundaries need no special case: a key
    counts only if it is a real token of the query's sequence (and inside one sequence, packed distance =
    position distance).

        stream   | block i-1 | block i | block i+1 |      queries: block i (w = half_window tokens)
                 '------ keys: 3w tokens ---------'       keys: blocks i-1, i, i+1 (zeros past the ends)
    """
    T, H, D = q.shape
    w = half_window  # the block length
    n = max(1, -(-T // w))  # query blocks: T / w rounded up (one, empty, when T = 0)
    tail = n * w - T  # padding that fills the last block

    def blocks_of_three(t, fill=0):  # (T, ...) -> (n, 3w, ...): the keys of blocks i-1, i, i+1 for each i
        token_dim_pads = (0, 0) * (t.dim() - 1) + (w, tail + w)  # F.pad lists the last dimension first
        return F.pad(t, token_dim_pads, value=fill).unfold(0, 3 * w, w).movedim(-1, 1)

    q_ids = F.pad(packing.seq_ids, (0, tail), value=-1).view(n, w)  # -1: past the end, its own "sequence"
    k_ids = blocks_of_three(packing.seq_ids.masked_fill(~packing.is_real, -2), fill=-1)  # (n, 3w); -2: padding
    in_band = band(torch.arange(w, 2 * w, device=q.device), torch.arange(3 * w, device=q.device), half_window)
    mask = ((q_ids[:, :, None] == k_ids[:, None, :]) & in_band)[:, None]  # (n, 1, w, 3w)
    qb = F.pad(q, (0, 0, 0, 0, 0, tail)).view(n, w, H, D).transpose(1, 2)  # (n, H, w, D)
    kb, vb = (blocks_of_three(t).transpose(1, 2) for t in (k, v))  # (n, H, 3w, D)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p)  # (n, H, w, D)
    return out.transpose(1, 2).reshape(n * w, H, D)[:T]


def flash_attention(q, k, v, packing, half_window, dropout_p=0.0, *, varlen):
    """FlashAttention-2 varlen (`varlen`, found by attention_kernels) on the packed stream: no padding, no mask, key
    blocks outside the window skipped. fp16/bf16 only: fp32 is cast to bf16 and back, as the official code does."""
    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    w = (-1, -1) if half_window is None else (half_window, half_window)  # inclusive on both sides, as the band
    cu, S = packing.cu_seqlens, packing.max_seqlen
    out = varlen(q, k, v, cu, cu, S, S, dropout_p=dropout_p, softmax_scale=q.shape[-1] ** -0.5, window_size=w)
    return out.to(dtype)


def attention_kernels(name, device, dtype, packing, half_window):
    """The one place kernels are chosen, once a forward: {layer type: kernel}, each choice here with its reason. None
    picks flash_attention_2 on a GPU in half precision where a varlen flash kernel is installed, sdpa otherwise."""
    check_attn_implementation(name)
    if packing.keeps_padding and is_exporting():  # a traced batch (pack_for_tracing) being exported:
        return dict.fromkeys(LAYER_TYPES, eager_attention)  # blocked and flex would fix their count of blocks
    if packing.keeps_padding and name in (None, "flash_attention_2"):
        name = "sdpa"  # a traced batch keeps its padding as tokens, which varlen flash cannot leave out
    half = dtype in (torch.float16, torch.bfloat16)
    varlen = find_flash_kernel(device) if name == "flash_attention_2" or (name is None and half) else None
    if name == "flash_attention_2" and varlen is None:
        raise flash_kernel_missing(device)  # says what to install, or which device to use
    name = name or ("flash_attention_2" if varlen else "sdpa")
    if name == "flex_attention":  # FlexAttention and its block masks, built once a forward (below the banner)
        return dict.fromkeys(LAYER_TYPES, flex_kernel(packing, half_window))
    flash = functools.partial(flash_attention, varlen=varlen)
    kernel = {"eager": eager_attention, "sdpa": sdpa_attention, "flash_attention_2": flash}[name]
    kernels = dict.fromkeys(LAYER_TYPES, kernel)
    if name == "sdpa" and device.type == "cpu" and not packing.keeps_padding:
        # Global layers on a CPU: one unmasked SDPA call per sequence computes no padding, and a loop is cheap there.
        kernels["full_attention"] = sdpa_per_sequence
    elif name != "eager" and packing.equal_lengths and not (name == "flash_attention_2" and dtype == torch.float32):
        # Equal lengths: the stream already is the (N, S) grid, and one dense call needs no mask (on a GPU cuDNN's
        # dense kernel then beats varlen flash). Not for a forced flash on fp32, which must stay in flash's bf16.
        kernels["full_attention"] = sdpa_equal_lengths
    return kernels


# ----------------------------------------------------------------------------------------------------
# The encoder. Each module names the init role of its weights (`init_roles`, read by init_weights).
#
# The stack, for ModernBERT-base (22 layers; global every 3rd, starting at layer 0):
#
#   tokens -> embeddings -> [G] L L [G] L L [G] L L [G] L L [G] L L [G] L L [G] L L [G] -> final_norm
#                            0  1 2  3  4 5  6                                        21
#   G: every token sees its whole sequence, RoPE theta 160000 (long range, slowly turning phases)
#   L: every token sees +-64 neighbours,   RoPE theta  10000 (short range, fast phases)


class ModernBertEmbeddings(nn.Module):
    """Token embeddings -> LayerNorm -> dropout. No position embeddings: RoPE does that inside attention."""

    init_roles = {"tok_embeddings": "input"}

    def __init__(self, config):
        super().__init__()
        pad_id = config.pad_token_id if config.pad_token_id in range(config.vocab_size) else None
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad_id)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.drop = nn.Dropout(config.embedding_dropout)

    def forward(self, x):  # token ids (T,), or inputs_embeds (T, hidden) that skip the lookup
        return self.drop(self.norm(x if x.is_floating_point() else self.tok_embeddings(x)))


class ModernBertAttention(nn.Module):
    init_roles = {"Wqkv": "input", "Wo": "output"}

    def __init__(self, config, layer_id):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.half_window = None if config.is_global(layer_id) else config.half_window
        self.dropout = config.attention_dropout
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.out_drop = nn.Dropout(config.attention_dropout)

    def forward(self, x, rope, packing, kernel):  # x: (T, hidden); rope(t): apply_rope at this forward's positions
        # One matmul for all three projections; the output is laid out [Q | K | V], each (H, D).
        qkv = self.Wqkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim)  # (T, 3, H, D)
        # Position enters only here: rotating q and k (in one call) makes q . k depend on their distance alone.
        q, k = rope(qkv[:, :2]).unbind(1)  # (T, H, D) each
        out = kernel(q, k, qkv[:, 2], packing, self.half_window, self.dropout if self.training else 0.0)
        return self.out_drop(self.Wo(out.flatten(1)))  # (T, H * D)


class ModernBertEncoderLayer(nn.Module):
    def __init__(self, config, layer_id):
        super().__init__()
        # Layer 0 has no attn_norm: the embedding norm just normalised its input (no checkpoint key either).
        norm = functools.partial(nn.LayerNorm, config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.attn_norm = nn.Identity() if layer_id == 0 else norm()
        self.attn = ModernBertAttention(config, layer_id)
        self.mlp_norm = norm()
        self.mlp = ModernBertMLP(config)

    def forward(self, x, rope, packing, kernel):  # pre-norm: the residual stream itself is never normed
        x = x + self.attn(self.attn_norm(x), rope, packing, kernel)
        return x + self.mlp(self.mlp_norm(x))


class ModernBertPreTrainedModel(nn.Module):
    """What every class shares: the config, weight init, loading, saving, and what transformers users reach for."""

    accepts_loss_kwargs = False  # transformers.Trainer: our losses average over the batch themselves

    def __init__(self, config):
        super().__init__()
        # A transformers ModernBertConfig is read through its dict, like a config.json.
        self.config = config if isinstance(config, ModernBertConfig) else ModernBertConfig.from_dict(config.to_dict())
        check_fits_in_memory(self.config)  # before a layer is built: memory would run out first

    @torch.no_grad()
    def init_weights(self, only=None):
        """The official init, once, by the class the user builds (its parts are built with init=False): truncated
        normals scaled by each weight's role, zero biases, LayerNorm weights 1. `only`: the loader's fresh heads."""
        c = self.config
        if self.device.type == "meta":  # load_checkpoint's build: shapes only, nothing to fill
            return
        std_in, std_out = c.initializer_range, c.initializer_range / math.sqrt(2.0 * c.num_hidden_layers)
        stds = {"input": std_in, "output": std_out, "classifier": c.hidden_size**-0.5}
        for parent_name, parent in self.named_modules():
            for name, m in parent.named_children():
                if only is not None and f"{parent_name}.{name}".lstrip(".") not in only:
                    continue
                if isinstance(m, nn.LayerNorm):
                    m.weight.fill_(1.0)
                elif isinstance(m, (nn.Linear, nn.Embedding)):
                    role = init_role(parent, name)
                    if role != "tied":  # the decoder's weight is the embeddings': only its bias is its own
                        trunc_normal_(m.weight, stds[role], c.initializer_cutoff_factor * stds[role])
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()

    def tie_weights(self):
        """Only the masked-LM class ties weights (its decoder to the embeddings)."""

    @classmethod
    def from_pretrained(cls, name_or_folder, revision=None, attn_implementation=None, dtype=None, device=None, **kw):
        """An official checkpoint (a folder, or a hub id fetched into the Hugging Face cache), loaded strictly."""
        return load_pretrained(cls, name_or_folder, revision, attn_implementation, dtype, device, kw)

    def save_pretrained(self, folder):  # config.json + model.safetensors in the official format, atomically
        save_checkpoint(self, folder)

    def compile(self, **kwargs):  # each encoder layer compiled once for every batch shape
        return compile_layers(self, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        set_checkpointing(self, gradient_checkpointing_kwargs or {}, every_n_layers, offload)

    def gradient_checkpointing_disable(self):
        set_checkpointing(self, None)

    def num_parameters(self, only_trainable=False, exclude_embeddings=False):
        skip = set(self.get_input_embeddings().parameters()) if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters() if (p.requires_grad or not only_trainable) and p not in skip)

    def get_input_embeddings(self):
        return next(m for m in self.modules() if isinstance(m, ModernBertEmbeddings)).tok_embeddings

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def dtype(self):
        return next(self.parameters()).dtype


class ModernBertModel(ModernBertPreTrainedModel):
    def __init__(self, config, init=True):
        super().__init__(config)
        config = self.config
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList(ModernBertEncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.checkpointing = None  # gradient checkpointing's options, when it is enabled
        if init:  # a head class that holds this backbone initialises it with its own weights
            self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, return_dict=None, **inputs):
        """input_ids (B, S) and attention_mask (B, S) of 0/1 (None: all real), or packed input (`pack_inputs`) ->
        last_hidden_state (B, S, hidden), zeros at padding; hidden_states: the embeddings, then each layer's."""
        hidden, packing, states = self.encode(input_ids, attention_mask, **inputs)
        return model_output(return_dict, packing, states, last_hidden_state=packing.to_input_shape(hidden))

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_hidden_states=False, **packed):
        """The packed forward every head builds on: hidden (T, hidden), its Packing, the layers' states if asked."""
        packing = pack_inputs(self.config, input_ids, attention_mask, inputs_embeds, packed)  # checked, then packed
        x = self.embeddings(unpad(input_ids if inputs_embeds is None else inputs_embeds, packing.indices))
        return self.run_layers(x, packing, output_hidden_states)

    def run_layers(self, x, packing, output_hidden_states=False):
        """The layers and the final norm on the packed tokens x (T, hidden): (hidden, packing, states)."""
        c = self.config
        # Chosen per forward, so config.attn_implementation can change between calls; autocast's dtype is the layers'.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        kernels = attention_kernels(c.attn_implementation, x.device, dtype, packing, c.half_window)
        # Half precision on a CPU: RoPE in pieces, whose fp32 temporaries stay in the caches (fp32 gains nothing).
        rotate = rope_in_chunks if x.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) else apply_rope
        tables = {t: rope_tables(*rope_frequencies(c, t), packing.positions) for t in LAYER_TYPES}  # (cos, sin) each
        ropes = {t: functools.partial(rotate, cos=cos, sin=sin) for t, (cos, sin) in tables.items()}
        states = [x] if output_hidden_states else None  # kept only when asked: 23 x (T, hidden) floats
        for layer, layer_type in zip(self.layers, c.layer_types):
            args = (x, ropes[layer_type], packing, kernels[layer_type])
            if self.checkpointing and self.training:  # keep only x; recompute the layer's insides in backward
                x = checkpoint(layer, *args, **self.checkpointing)
            else:
                x = layer(*args)
            if states is not None:
                states.append(x)
        x = self.final_norm(x)
        if states is not None:
            states[-1] = x  # as transformers 5: the last hidden state is the normed one
        return x, packing, states


# ----------------------------------------------------------------------------------------------------
# Task heads. All share the pretrained prediction head (dense -> GELU -> norm) and run on packed tokens.
# Each takes input_ids, attention_mask, labels, return_dict; the rest goes on to the encoder.


class ModernBertPredictionHead(nn.Module):
    init_roles = {"dense": "output"}

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.act = ACTIVATIONS[config.classifier_activation]()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

    def forward(self, x):
        return self.norm(self.act(self.dense(x)))


def pool(hidden, packing, how):
    """One vector per sequence: 'cls' takes its first real token, 'mean' averages its real tokens."""
    if not torch.compiler.is_compiling():
        check_poolable(packing)
    if how == "cls":  # the first token of each sequence in the packed stream: [CLS], wherever padding was
        return hidden[packing.cu_seqlens[:-1].long()]
    real = packing.is_real[:, None].to(hidden.dtype)
    sums = hidden.new_zeros(packing.num_seqs, hidden.shape[-1]).index_add_(0, packing.seq_ids, hidden * real)
    return sums / real.new_zeros(packing.num_seqs, 1).index_add_(0, packing.seq_ids, real)


class ModernBertForMaskedLM(ModernBertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = ModernBertModel(self.config, init=False)
        self.head = ModernBertPredictionHead(self.config)
        self.decoder = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=self.config.decoder_bias)
        self.init_roles = {"decoder": "tied" if self.config.tie_word_embeddings else "output"}
        self.tie_weights()
        self.init_weights()

    def tie_weights(self):
        """One matrix reads and writes tokens: the decoder's weight is the embeddings' (stored once)."""
        if self.config.tie_word_embeddings:
            self.decoder.weight = self.model.embeddings.tok_embeddings.weight

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **inputs):
        """logits (B, S, vocab), zeros at padded positions. With config.sparse_prediction and labels,
        only positions whose label is not the ignore index are decoded: logits (N_masked, vocab)."""
        hidden, packing, states = self.model.encode(input_ids, attention_mask, **inputs)
        sparse = self.config.sparse_prediction and labels is not None
        ignore = self.config.sparse_pred_ignore_index if sparse else -100
        if labels is not None:
            labels = token_labels(labels, packing, ignore)  # (T,)
        if sparse:  # skip the vocabulary-wide matmul for the tokens nobody asked about
            keep = labels != ignore
            hidden, labels = hidden[keep], labels[keep]
        logits = self.decoder(self.head(hidden))  # (T or N_masked, vocab)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels, ignore_index=ignore)
        logits = logits if sparse else packing.to_input_shape(logits)
        return model_output(return_dict, packing, states, loss=loss, logits=logits)


class ModernBertWithClassifier(ModernBertPreTrainedModel):
    """What the four classifying heads share: backbone -> head -> dropout -> classifier (with bias)."""

    init_roles = {"classifier": "classifier"}

    def __init__(self, config, num_outputs=None):
        super().__init__(config)
        self.model = ModernBertModel(self.config, init=False)
        self.head = ModernBertPredictionHead(self.config)
        self.drop = nn.Dropout(self.config.classifier_dropout)
        self.classifier = nn.Linear(self.config.hidden_size, num_outputs or self.config.num_labels)
        self.init_weights()


class ModernBertForSequenceClassification(ModernBertWithClassifier):
    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **inputs):
        """logits (N, num_labels), one row per sequence. Pooling happens before the head."""
        hidden, packing, states = self.model.encode(input_ids, attention_mask, **inputs)
        logits = self.classifier(self.drop(self.head(pool(hidden, packing, self.config.classifier_pooling))))
        loss = None if labels is None else sequence_classification_loss(logits, labels, self.config)
        return model_output(return_dict, packing, states, loss=loss, logits=logits)


class ModernBertForTokenClassification(ModernBertWithClassifier):
    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **inputs):
        """logits (B, S, num_labels), zeros at padded positions; loss ignores label -100."""
        hidden, packing, states = self.model.encode(input_ids, attention_mask, **inputs)
        logits = self.classifier(self.drop(self.head(hidden)))  # (T, num_labels)
        loss = None if labels is None else F.cross_entropy(logits.float(), token_labels(labels, packing))
        return model_output(return_dict, packing, states, loss=loss, logits=packing.to_input_shape(logits))


class ModernBertForQuestionAnswering(ModernBertWithClassifier):
    def __init__(self, config):
        check_question_answering_labels(config)  # before building a model that cannot be used
        super().__init__(config)

    def forward(
        self, input_ids=None, attention_mask=None, start_positions=None, end_positions=None, return_dict=None, **inputs
    ):
        """start_logits, end_logits (B, S), zeros at padded positions; the loss is question_answering_loss."""
        hidden, packing, states = self.model.encode(input_ids, attention_mask, **inputs)
        logits = packing.to_input_shape(self.classifier(self.drop(self.head(hidden))))  # (B, S, 2)
        start_logits, end_logits = (t.contiguous() for t in logits.unbind(dim=-1))
        loss = None
        if start_positions is not None or end_positions is not None:
            loss = question_answering_loss(start_logits, end_logits, start_positions, end_positions, packing)
        return model_output(return_dict, packing, states, loss=loss, start_logits=start_logits, end_logits=end_logits)


class ModernBertForMultipleChoice(ModernBertWithClassifier):
    def __init__(self, config):
        super().__init__(config, num_outputs=1)  # one score per choice

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **inputs):
        """input_ids (B, C, S), one row per choice -> logits (B, C). `inputs`: inputs_embeds (B, C, S, hidden),
        output_hidden_states; packed input does not apply (each choice is its own padded row)."""
        B, C, S = check_multiple_choice(input_ids, attention_mask, labels, inputs)
        flat = lambda t: None if t is None else t.reshape(B * C, *t.shape[2:])  # noqa: E731  (B, C, S) -> (B*C, S)
        ids, mask, embeds = (flat(t) for t in (input_ids, attention_mask, inputs.get("inputs_embeds")))
        hidden, packing, states = self.model.encode(ids, mask, embeds, inputs.get("output_hidden_states", False))
        logits = self.classifier(self.drop(self.head(pool(hidden, packing, self.config.classifier_pooling))))
        loss = None if labels is None else F.cross_entropy(logits.view(B, C).float(), labels.to(logits.device))
        return model_output(return_dict, packing, states, loss=loss, logits=logits.view(B, C))


# ----------------------------------------------------------------------------------------------------
# PLUMBING. The model ends above, and a first reading may stop here. What follows serves it: outputs and losses
# as transformers has them, config files, RoPE scaling for long context, the door from a forward's inputs, faster
# kernels, weight init, compiling, the hub, loading and saving, and the input checks.


class ModernBertOutput(dict):
    """What every model returns, as transformers' ModelOutput: a dict of the fields set, in the official order, read by
    attribute (`out.logits`, None when not set), key (`out["loss"]`) or position (`out[0]`, `out.to_tuple()`)."""

    FIELDS = ("loss", "logits", "start_logits", "end_logits", "last_hidden_state", "hidden_states")

    def __init__(self, **values):
        super().__init__((k, values[k]) for k in self.FIELDS if values.get(k) is not None)

    def __getattr__(self, name):
        if name in self.FIELDS:
            return self.get(name)
        raise AttributeError(f"ModernBertOutput has no field {name!r}")

    def __getitem__(self, key):
        return self.to_tuple()[key] if isinstance(key, (int, slice)) else super().__getitem__(key)

    def to_tuple(self):
        return tuple(self.values())


# torch.export and the ONNX exporter flatten outputs into tensors: this says how (transformers does the same).
torch.utils._pytree.register_pytree_node(
    ModernBertOutput,
    lambda out: (list(out.values()), list(out)),
    lambda values, keys: ModernBertOutput(**dict(zip(keys, values))),
    serialized_type_name="modernbert.ModernBertOutput",
    flatten_with_keys_fn=lambda out: ([(torch.utils._pytree.MappingKey(k), v) for k, v in out.items()], list(out)),
)


def model_output(return_dict, packing, states, **values):
    """A ModernBertOutput, the per-layer states (if kept) in the input's shape; its tuple if return_dict=False."""
    hidden_states = None if states is None else tuple(packing.to_input_shape(h) for h in states)
    out = ModernBertOutput(**values, hidden_states=hidden_states)
    return out.to_tuple() if return_dict is False else out


# ----------------------------------------------------------------------------------------------------
# Losses, as transformers computes them (its problem_type convention), but in fp32 in every head (transformers keeps
# these two in the model's dtype) and for padding in question answering. Labels move to the logits' device.


def sequence_classification_loss(logits, labels, config):
    """Regression for one label, cross-entropy for integer labels, BCE for float multi-labels."""
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} rows for {logits.shape[0]} sequences.")
    logits, labels, problem = logits.float(), labels.to(logits.device), config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        if config.num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return F.mse_loss(logits, labels)
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise ValueError(f"problem_type {problem!r} is unknown")


def question_answering_loss(start_logits, end_logits, start_positions, end_positions, packing):
    """The mean of the start and end cross-entropies over real tokens; positions outside [0, S) are
    ignored, as officially. Padding is never a candidate answer (the official loss counts it)."""
    if (start_positions is None) != (end_positions is None):
        raise ValueError("Pass both start_positions and end_positions, or neither.")
    B, S = packing.input_shape
    real = packing.attention_mask()  # (B, S)
    losses = []
    ends = {"start_positions": (start_logits, start_positions), "end_positions": (end_logits, end_positions)}
    for name, (logits, positions) in ends.items():
        positions = positions.view(-1) if positions.dim() == 2 and positions.shape[1] == 1 else positions
        check_labels(positions, (B,), name)
        logits = logits.float().masked_fill(~real, torch.finfo(torch.float32).min)
        losses.append(F.cross_entropy(logits, positions.to(logits.device).clamp(0, S), ignore_index=S))
    return (losses[0] + losses[1]) / 2


# ----------------------------------------------------------------------------------------------------
# Config files: both official formats in, both spellings out.


def config_from_dict(cls, d):
    """A config.json of either official format: v4 (`global_rope_theta`, `global_attn_every_n_layers`, `rope_scaling`
    into both layer types, as transformers reads it) or v5 (`layer_types`, `rope_parameters`). Others are ignored."""
    kwargs = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)}}
    if d.get("rope_scaling") and not isinstance(d["rope_scaling"], dict):
        refuse_config([f"rope_scaling must be a dict or null, got {d['rope_scaling']!r}"])
    if d.get("rope_scaling"):
        rope = kwargs.get("rope_parameters") or {}
        kwargs["rope_parameters"] = {t: {**(rope.get(t) or {}), **d["rope_scaling"]} for t in LAYER_TYPES}
    if kwargs.get("id2label"):
        kwargs.pop("num_labels", None)  # the label map decides
    return cls(**kwargs)


def agree_labels(config, fresh=False):
    """The label fields of a config: id2label decides (its JSON keys are strings), num_labels and label2id follow;
    without one (or `fresh`: a new num_labels), LABEL_0, LABEL_1, ... for num_labels."""
    if fresh:
        config.id2label = config.label2id = None
    if config.id2label is None:
        config.id2label = {i: f"LABEL_{i}" for i in range(config.num_labels)}
    config.id2label = {int(k): v for k, v in config.id2label.items()}
    config.num_labels = len(config.id2label)
    if config.label2id is None:
        config.label2id = {v: k for k, v in config.id2label.items()}


def config_to_dict(config):
    """config.json in the official format, written in both spellings so transformers 4 and 5 read it."""
    d = asdict(config)
    d.pop("attn_implementation")
    d["rope_parameters"] = {t: {**config.rope_parameters[t], "rope_theta": config.rope_theta(t)} for t in LAYER_TYPES}
    d["id2label"] = {str(k): v for k, v in config.id2label.items()}
    d["model_type"] = "modernbert"
    return d


# ----------------------------------------------------------------------------------------------------
# RoPE scaling. Long-context checkpoints stretch RoPE past the length it was trained at, per layer type
# (config.rope_parameters, as transformers names them): "linear" slows every frequency by `factor`; "yarn" (the
# family's 32K checkpoints) slows only the dimensions that turn less than once within the original length, and
# sharpens attention; "dynamic" changes nothing up to max_position_embeddings, and longer is refused here as for
# every type (transformers rescales it by the padded batch's width there). Bitwise transformers' numbers.

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn")


def normalize_rope(config):
    """config.rope_parameters as transformers completes them, one entry per layer type (none: plain RoPE); each
    entry's rope_theta moves to its field (global_rope_theta, local_rope_theta), the one place a base lives."""
    given, defaults = config.rope_parameters or {}, {f.name: f.default for f in fields(config)}
    if unknown := sorted(set(given) - set(LAYER_TYPES)):
        raise ValueError(f"rope_parameters has {unknown}: its keys are the layer types {LAYER_TYPES}")
    config.rope_parameters = {}
    for t, name in ROPE_THETA_FIELDS.items():
        rope = dict(given.get(t) or {})
        rope.setdefault("rope_type", rope.get("type", "default"))  # the legacy key stays, as in transformers
        if rope["rope_type"] == "yarn":
            rope.setdefault("original_max_position_embeddings", config.max_position_embeddings)
        if (theta := rope.pop("rope_theta", None)) is not None:
            if getattr(config, name) not in (theta, defaults[name]):
                raise ValueError(f"{name} and rope_parameters[{t!r}]['rope_theta'] disagree: pass one")
            setattr(config, name, theta)
        config.rope_parameters[t] = rope


def scaled_frequencies(inv_freq, rope, theta, config):
    """rope_frequencies for a scaled rope_type: linear divides every frequency by `factor`; dynamic keeps them (up
    to max_position_embeddings, the longest allowed); yarn computes its own, as transformers does."""
    if rope["rope_type"] == "yarn":
        return yarn_frequencies(rope, theta, config.head_dim, config.max_position_embeddings)
    return (inv_freq / rope["factor"] if rope["rope_type"] == "linear" else inv_freq), 1.0


def yarn_frequencies(rope, theta, dim, max_position_embeddings):
    """YaRN (Peng et al., 2023): the dimensions that turn many times within the original length keep their
    frequency, those that turn less than once are slowed by `factor` (as linear), a linear ramp between; cos and
    sin are scaled by the attention factor, so the scores by its square. transformers' operations, in its order."""
    original = rope["original_max_position_embeddings"]
    factor = rope["factor"] if rope["factor"] is not None else max_position_embeddings / original

    def mscale(m=1.0):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    attention_factor, m, m_all = rope.get("attention_factor"), rope.get("mscale"), rope.get("mscale_all_dim")
    if attention_factor is None:
        attention_factor = float(mscale(m) / mscale(m_all)) if m and m_all else mscale()

    def dimension(rotations):  # the dimension that turns `rotations` times over the original length
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dimension(rope.get("beta_fast") or 32)), 0)
    high = min(math.ceil(dimension(rope.get("beta_slow") or 1)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high + 0.001 * (low == high)) - low)).clamp(0, 1)
    kept = 1 - ramp  # 1: the frequency kept (fast dimensions); 0: divided by factor (slow ones)
    frequencies = theta ** (torch.arange(0, dim, 2).float() / dim)
    return 1.0 / (factor * frequencies) * (1 - kept) + 1.0 / frequencies * kept, attention_factor


# ----------------------------------------------------------------------------------------------------
# The door from a forward's inputs to a Packing: a padded batch, packed input, labels, and the traced path.

BOUNDARY_KEYS = ("cu_seqlens", "cu_seq_lens_q", "cu_seq_lens_k")  # ours, then DataCollatorWithFlattening's
PACKED_INPUTS = (*BOUNDARY_KEYS, "position_ids", "max_length_q", "max_length_k", "seq_idx")  # the collator's too


def pack_inputs(config, input_ids, attention_mask, inputs_embeds, packed):
    """The one door from a forward's inputs to a Packing, after `check_inputs`: a padded batch and its mask, or
    packed input (B = 1) with cu_seqlens or the keys of transformers' DataCollatorWithFlattening."""
    tracing = torch.compiler.is_compiling()  # torch.compile or torch.export: no shape may depend on data
    check_inputs(config, input_ids, attention_mask, inputs_embeds, packed, read_values=not tracing)
    packed = {k: v for k, v in packed.items() if v is not None}
    x = input_ids if input_ids is not None else inputs_embeds
    (B, S), device = x.shape[:2], x.device
    given = [packed[k] for k in BOUNDARY_KEYS if k in packed]  # (torch 2.8's dynamo refuses next() with a default)
    cu = given[0] if given else None
    if cu is None and "position_ids" in packed:
        cu = position_starts(packed["position_ids"][0], S)
    if cu is not None:
        packing = packing_from_cu_seqlens(torch.as_tensor(cu, device=device), packed.get("max_length_q"), S)
    else:
        mask = torch.ones(B, S, dtype=torch.long, device=device) if attention_mask is None else attention_mask
        if tracing:
            return pack_for_tracing(mask.to(device))
        packing = Packing.from_mask(mask.to(device))
    if not tracing:
        check_length(config, packing.max_seqlen)
    return packing


def longest_length(lengths):
    """The longest sequence's length, and whether all have it: one host sync a forward."""
    shortest, longest = torch.stack((lengths.min(), lengths.max())).tolist()
    return longest, shortest == longest


def packing_from_cu_seqlens(cu_seqlens, max_seqlen, total):
    """Already-packed input (1, total). A given max_seqlen (the collator's max_length_q) saves the host
    sync, so torch.compile can trace all of it."""
    equal = False
    if max_seqlen is None:
        max_seqlen, equal = longest_length(cu_seqlens.diff())
    indices = torch.arange(total, device=cu_seqlens.device)
    return Packing(indices, cu_seqlens.to(torch.int32), max_seqlen, (1, total), equal_lengths=equal)


def position_starts(positions, total):
    """Packed (T,) position_ids -> cu_seqlens: a sequence starts wherever the positions restart at 0."""
    return F.pad((positions == 0).nonzero().squeeze(1), (0, 1), value=total)


def token_labels(labels, packing, ignore_index=-100):
    """Labels (B, S) -> (T,), the packed stream's, on its device. A label on a padded position is an error."""
    labels = labels.to(packing.indices.device)
    if not torch.compiler.is_compiling():
        check_token_labels(labels, packing, ignore_index)
    return unpad(labels, packing.indices).masked_fill(~packing.is_real, ignore_index)


def pack_for_tracing(attention_mask):
    """The Packing for torch.compile and torch.export of a padded batch, where `nonzero` (unpadding) cannot run: each
    row's real tokens move, in order, to its front, and every slot of the (B, S) input stays a token, one row one
    sequence; the padding rides along at the end of each row, hidden from attention as a key (`is_real`)."""
    B, S = attention_mask.shape
    real = attention_mask.bool()
    slots = torch.arange(S, device=real.device)
    order = torch.argsort(torch.where(real, slots, slots + S), dim=1)  # (B, S): real slots first, in order
    indices = (order + torch.arange(B, device=real.device)[:, None] * S).flatten()
    cu_seqlens = torch.arange(0, B * S + 1, S, dtype=torch.int32, device=real.device)
    seq_ids = torch.arange(B * S, device=real.device) // S  # (ONNX has no repeat_interleave with a length)
    is_real = real.gather(1, order).flatten()
    return Packing(indices, cu_seqlens, S, (B, S), is_real, keeps_padding=True, seq_ids=seq_ids)


def is_exporting():
    """Whether torch.export (ONNX's too) is tracing, not torch.compile: the flag torch.export sets, read directly.
    Before torch 2.12 dynamo takes torch.compiler.is_exporting() for True under torch.compile too, which would hand
    every compiled padded batch export's kernel, and its S x S scores."""
    return torch.compiler._is_exporting_flag


# ----------------------------------------------------------------------------------------------------
# Faster kernels: the same math (RoPE, the attention rule) computed the way a batch, device or tracer runs it best,
# each chosen on the path (encode, attention_kernels).


ROPE_CHUNK = 256  # tokens: RoPE's fp32 temporaries for that many stay in a CPU's caches


def rope_in_chunks(x, cos, sin):
    """apply_rope ROPE_CHUNK tokens at a time, for half precision on a CPU (encode chooses it): each piece's
    temporaries are reused from the caches, where the whole stream's would be fresh memory. split, then cat: the
    backward is one cat, not a zero-filled gradient of the whole stream for every piece (what slicing would leave).
    Traced (Inductor fuses RoPE whole) or no longer than a chunk: one pass."""
    if torch.compiler.is_compiling() or x.shape[0] <= ROPE_CHUNK:
        return apply_rope(x, cos, sin)
    pieces = zip(x.split(ROPE_CHUNK), cos.split(ROPE_CHUNK), sin.split(ROPE_CHUNK))
    return torch.cat([apply_rope(*piece) for piece in pieces])


def sdpa_per_sequence(q, k, v, packing, half_window=None, dropout_p=0.0):
    """Global layers on a CPU: one unmasked SDPA call per sequence takes the fused kernel and computes no padding,
    and a Python loop costs nothing there (on a GPU it would be N launches and a host sync)."""
    if torch.compiler.is_compiling():  # inside a compiled layer the loop would break the graph
        return (sdpa_equal_lengths if packing.equal_lengths else sdpa_attention)(q, k, v, packing, None, dropout_p)
    lengths = packing.cu_seqlens.diff().tolist()
    out = []
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):  # split: a cheap backward
        qs, ks, vs = (t[None].transpose(1, 2) for t in (qs, ks, vs))  # (1, H, L, D)
        if q.dtype != torch.float32:  # the CPU kernel reads strided half-precision heads slowly: head-major
            qs, ks, vs = qs.contiguous(), ks.contiguous(), vs.contiguous()
        out.append(F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout_p)[0].transpose(0, 1))
    return torch.cat(out)


def sdpa_equal_lengths(q, k, v, packing, half_window=None, dropout_p=0.0):
    """Global attention when all N sequences have S tokens: one SDPA call on the stream viewed as (N, S)."""
    N, S = packing.num_seqs, packing.max_seqlen
    qg, kg, vg = (t.view(N, S, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))  # (N, H, S, D)
    return F.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout_p).transpose(1, 2).flatten(0, 1)


FLEX_BLOCK = 128  # FlexAttention visits queries and keys in tiles of 128 x 128
FLEX_ON_CPU = torch.__version__ >= "2.13"  # the CPU kernels of 2.8-2.12 (4 tried) abort the process on our masks


def flex_kernel(packing, half_window):
    """flex_attention with the block masks of both layer types, built once a forward and shared by their layers."""
    masks = {w: flex_block_mask(packing, w) for w in (None, half_window)} if packing.indices.shape[0] else {}
    return functools.partial(flex_attention, block_masks=masks)


def flex_attention(q, k, v, packing, half_window, dropout_p=0.0, block_masks=None):
    """torch's FlexAttention: the rule as a Python function (mask_mod), compiled into one fused kernel that skips
    every 128 x 128 tile the rule leaves empty. `block_masks`: {half-window: BlockMask}, from `flex_kernel`."""
    # On a CPU torch 2.13's flex has no backward pass and compiles only alone, and its AVX2 kernel gives wrong numbers
    # (NaN on local layers) for a stream shorter than one 128-token tile: sdpa (the same rule) serves there.
    if q.device.type == "cpu" and (torch.compiler.is_compiling() or q.requires_grad):
        return sdpa_attention(q, k, v, packing, half_window, dropout_p)
    if dropout_p:
        raise RuntimeError("FlexAttention has no attention dropout: use attn_implementation='sdpa' to train with it.")
    if q.device.type == "cpu" and q.shape[0] < 128:
        return sdpa_attention(q, k, v, packing, half_window)
    if q.device.type == "cpu" and not FLEX_ON_CPU:
        raise RuntimeError(
            f"FlexAttention on a CPU needs torch >= 2.13 (this is {torch.__version__}): use attn_implementation='sdpa'"
            " (the same rule) on a CPU, or upgrade torch."
        )
    if q.shape[0] == 0:  # no real token in the batch: nothing to attend to
        return q
    block_mask = (block_masks or {}).get(half_window)
    if block_mask is None:  # a window the forward did not build for (a layer changed by hand)
        block_mask = flex_block_mask(packing, half_window)
    # (1, H, T, D), contiguous: Inductor's CPU lowering of flex rejects strided views.
    q, k, v = (t.transpose(0, 1)[None].contiguous() for t in (q, k, v))
    out = compiled_flex()(q, k, v, block_mask=block_mask, scale=q.shape[-1] ** -0.5)
    return out[0].transpose(0, 1)


def flex_block_mask(packing, half_window):
    """The rule as FlexAttention's block mask: `mask_mod` decides each (query, key) pair of the stream; the tiles to
    visit come from the layout, not from evaluating the rule on all T x T pairs as torch's create_block_mask does:
    the keys a tile of queries may see are one contiguous run of the stream, found by binary search."""
    from torch.nn.attention.flex_attention import BlockMask

    seq, pos, real = packing.seq_ids, packing.positions, packing.is_real
    T = seq.shape[0]
    # The half-window as a tensor: the C++ template fails to compile it as a Python int, which dynamic=True
    # makes symbolic; and one compiled kernel then serves every window.
    half = torch.tensor(0 if half_window is None else half_window, device=seq.device)

    def mask_mod(b, h, q, k):  # the rule, for each query q and key k of the stream
        allowed = (seq[q] == seq[k]) & real[k]
        return allowed if half_window is None else allowed & ((pos[q] - pos[k]).abs() <= half)

    reach = T if half_window is None else half_window
    order = seq.long() * (2 * T + 1) + pos  # sorted; a reach of <= T never crosses into the next sequence
    first = torch.arange(0, T, FLEX_BLOCK, device=seq.device)  # each tile's first and last query
    last = (first + FLEX_BLOCK - 1).clamp(max=T - 1)
    n = first.shape[0]  # tiles
    lo = torch.searchsorted(order, order[first] - reach) // FLEX_BLOCK  # (n,): the first key tile, and
    hi = (torch.searchsorted(order, order[last] + reach, right=True) - 1) // FLEX_BLOCK  # the last one
    tiles = (lo[:, None] + torch.arange(n, device=seq.device)).clamp(max=n - 1)[None, None].int()  # lo, lo + 1..
    count = (hi - lo + 1)[None, None].int()  # (1, 1, n): how many key tiles each query tile visits
    return BlockMask.from_kv_blocks(count, tiles, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(T, T))


def compiled_flex():
    """torch's flex_attention, compiled once a process for every shape (uncompiled, it is a reference that builds
    every score); inside a traced graph (torch.compile, torch.export) the tracer compiles it."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention if torch.compiler.is_compiling() else compile_once(flex_attention)


@functools.cache
def compile_once(fn):
    return torch.compile(fn, dynamic=True)


if torch.__version__ < "2.8":  # the lowest release the tests run on (docs/testing.md)
    raise ImportError(f"modernbert.py needs torch >= 2.8, this is {torch.__version__}: `pip install -U torch`")

try:  # torch's own varlen flash kernel; only releases whose signature has window_size can serve
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


def find_flash_kernel(device):
    """The varlen flash kernel for `device`, with flash_attn's signature: flash-attn's, else torch's own; None if
    neither serves (not a CUDA device, or neither installed)."""
    if device.type != "cuda":
        return None
    try:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func
    except ImportError:
        pass
    if varlen_attn is not None and "window_size" in inspect.signature(varlen_attn).parameters:
        return torch_varlen
    return None


def flash_kernel_missing(device):
    """The error for flash_attention_2 where find_flash_kernel found no kernel: which device, or what to install."""
    if device.type != "cuda":
        return RuntimeError(
            f"attn_implementation='flash_attention_2' needs a CUDA GPU, but the model is on {device}. "
            "Use 'sdpa' (or None to choose) on this device."
        )
    return RuntimeError(
        "attn_implementation='flash_attention_2' needs a varlen flash kernel: `pip install flash-attn "
        "--no-build-isolation`, or torch >= 2.11, whose torch.nn.attention.varlen.varlen_attn takes window_size."
    )


def torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, window_size=(-1, -1)):
    """torch's varlen_attn behind flash_attn_varlen_func's signature."""
    if dropout_p:
        raise RuntimeError("torch's varlen_attn has no dropout: install flash-attn to train with attention dropout")
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=softmax_scale, window_size=window_size)


# ----------------------------------------------------------------------------------------------------
# Weight init: the sampler and the role lookup that init_weights uses.


@torch.no_grad()
def trunc_normal_(weight, std, cutoff):
    """A normal of spread `std` cut at +-cutoff, as the official init: draw normals, then redraw only those outside
    the cutoff until none is (torch's trunc_normal_, the same distribution, runs erfinv on every value: slower)."""
    flat = weight.view(-1).normal_(0.0, std)
    redraw = (flat.abs() > cutoff).nonzero().squeeze(1)
    while redraw.numel():
        flat[redraw] = flat.new_empty(redraw.numel()).normal_(0.0, std)
        redraw = redraw[flat[redraw].abs() > cutoff]
    return weight


def init_role(module, name):
    """The role `module` gives its weight `name` in its `init_roles`; none is an error (no inherited scale)."""
    role = getattr(module, "init_roles", {}).get(name)
    if role is None:
        owner = type(module).__name__
        raise TypeError(f"{owner}.{name} has no init role: add it to {owner}.init_roles ('input', 'output', ...).")
    return role


# ----------------------------------------------------------------------------------------------------
# Compiling and gradient checkpointing


def compile_layers(model, **kwargs):
    """model.compile(): each encoder layer compiled once for every batch shape, so Inductor fuses the elementwise
    work (RoPE, GeGLU, norms, residuals); packing and the kernel choice stay eager, so unpadding keeps working."""
    for module in model.modules():
        if isinstance(module, ModernBertEncoderLayer):
            module.compile(dynamic=True, **kwargs)
    return model


def set_checkpointing(model, options, every_n_layers=1, offload=False):
    """gradient_checkpointing_enable (options: a dict) / _disable (None): recompute each layer's activations in the
    backward pass instead of keeping them. transformers.Trainer's every_n_layers and offload: their defaults only."""
    if every_n_layers != 1 or offload:
        raise ValueError("Gradient checkpointing here covers every layer and keeps activations on the device.")
    for module in model.modules():
        if isinstance(module, ModernBertModel):
            module.checkpointing = None if options is None else {"use_reentrant": False, **options}


# ----------------------------------------------------------------------------------------------------
# The hub, loading and saving official checkpoints (config.json + model.safetensors, or sharded with an index).

CHECKPOINT_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json")  # what a hub id fetches
FOLDER_HINT = "To use a checkpoint on disk, pass its folder."
DOWNLOAD_OPTIONS = ("cache_dir", "local_files_only", "token")  # checkpoint_folder's, named as transformers does


def load_pretrained(cls, name_or_folder, revision, attn_implementation, dtype, device, kwargs):
    """from_pretrained: every keyword read or refused before anything is downloaded, then `load_checkpoint`."""
    device, dtype, download, config = loading_arguments(device, dtype, kwargs)
    folder = checkpoint_folder(name_or_folder, revision, **download)
    return load_checkpoint(cls, folder, attn_implementation, dtype, device, **config)


def loading_arguments(device, dtype, kwargs):
    """from_pretrained's keywords: transformers' spellings where they mean one thing here (torch_dtype, a device_map
    naming one device, the download options), the rest config fields. -> (device, dtype, download, overrides)."""
    kwargs = dict(kwargs)
    if (torch_dtype := kwargs.pop("torch_dtype", None)) is not None:
        if dtype is not None:
            raise TypeError(f"Pass dtype or torch_dtype (its old name), not both: got {dtype} and {torch_dtype}.")
        warnings.warn("`torch_dtype` is deprecated! Use `dtype` instead!", FutureWarning, stacklevel=users_line())
        dtype = torch_dtype
    dtype = parse_dtype(dtype)
    if (device_map := kwargs.pop("device_map", None)) is not None:
        mapped = single_device(device_map)
        if device is not None and torch.device(device) != mapped:
            raise ValueError(f"device={device!r} and device_map={device_map!r} ({mapped}) disagree: pass one.")
        device = mapped
    download = {k: kwargs.pop(k) for k in DOWNLOAD_OPTIONS if k in kwargs}
    if unknown := sorted(set(kwargs) - {f.name for f in fields(ModernBertConfig)}):
        raise TypeError(
            f"Unexpected keyword argument {unknown[0]!r}: no ModernBertConfig field has that name. from_pretrained "
            "takes revision, attn_implementation, dtype (or torch_dtype), device (or device_map), "
            f"{', '.join(DOWNLOAD_OPTIONS)}, and config fields to override, like num_labels=3."
        )
    return device, dtype, download, kwargs


def single_device(device_map):
    """A device_map that puts the whole model on one device: "auto" (the accelerator if there is one, else the CPU),
    "cuda:1", "cpu", a torch.device, an int (that GPU), or {"": device}. There is no dispatching over devices."""
    if isinstance(device_map, dict) and list(device_map) == [""]:
        device_map = device_map[""]
    if device_map == "auto":
        return pick_device("auto")
    if isinstance(device_map, int) and not isinstance(device_map, bool) and device_map >= 0:
        return torch.device("cuda", device_map)
    if isinstance(device_map, (str, torch.device)):
        try:
            return torch.device(device_map)
        except RuntimeError:
            pass  # not a device name: "balanced", "sequential", "disk", a typo
    raise ValueError(
        f"device_map={device_map!r} does not name one device. This loader puts the whole model on one device: "
        'pass device_map="auto" (the GPU if there is one), "cuda", "cuda:1", "cpu", a torch.device, or device=.'
    )


DTYPES = {  # the dtype names every door takes (from_pretrained, load.py, embed.py, the command lines): torch's, short
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype):
    """None, a torch dtype, or a name in DTYPES ("bfloat16", "bf16") -> None or the torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}: pass a torch dtype (torch.bfloat16) or one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def pick_device(name=None):
    """The device to run on: one named ("cpu", "cuda:1", "mps", a torch.device), or for None and "auto" the
    accelerator torch can use here (a CUDA or ROCm GPU, Apple's MPS, ...), else the CPU. A GPU or MPS named where
    torch sees none is an error."""
    if name is None or name == "auto":
        return available_accelerator() or torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"torch sees no CUDA GPU here, so the device cannot be {str(name)!r}: use 'cpu'.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"torch sees no Apple MPS device here, so the device cannot be {str(name)!r}: use 'cpu'.")
    return device


def available_accelerator():
    """The accelerator torch can use here, or None: a CUDA (or ROCm) GPU first, else what torch.accelerator names."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.accelerator.current_accelerator(check_available=True)


def checkpoint_folder(
    name_or_folder, revision=None, cache_dir=None, local_files_only=False, token=None, files=CHECKPOINT_FILES
):
    """The folder holding a checkpoint: `name_or_folder` itself if it is a folder, else that hub id's snapshot in the
    Hugging Face cache (shared with transformers), downloaded if needed: the `files` patterns (load.py adds the
    tokenizer's). The download options are huggingface_hub's; a revision with a folder is an error."""
    path = os.path.expanduser(str(name_or_folder))
    if os.path.isdir(path):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub ids, but {path!r} is a local folder.")
        return path
    if os.path.isfile(path):  # model.safetensors, say: the checkpoint is the folder that holds it
        folder = os.path.dirname(path) or "."
        raise NotADirectoryError(f"{path!r} is a file: pass the checkpoint's folder, {folder!r}.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    repo = str(name_or_folder)
    no_folder = "no such folder" + ("" if os.path.isabs(path) else f" here ({os.path.abspath(path)})")  # a typo?
    options = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    try:  # etag_timeout: the library's default today, pinned so a stalled network fails fast whatever it becomes
        return snapshot_download(repo, allow_patterns=list(files), etag_timeout=10, **options)
    except HFValidationError:
        raise FileNotFoundError(
            f"No checkpoint at {repo!r}: {no_folder}, and not a valid hub id (like 'answerdotai/ModernBERT-base'). "
            f"{FOLDER_HINT}"
        ) from None
    except RepositoryNotFoundError:  # also a private or gated repo without a login
        raise OSError(
            f"No checkpoint at {repo!r}: {no_folder}, and the Hugging Face hub has no model of that name "
            f"(or it is private: `hf auth login`). {FOLDER_HINT}"
        ) from None
    except RevisionNotFoundError:
        raise OSError(f"The hub model {repo!r} has no revision {revision!r}.") from None
    except OSError as e:  # no network, HF_HUB_OFFLINE=1 or local_files_only with an empty cache, an HTTP error
        reason = (str(e.__cause__ or e).strip() or type(e).__name__).splitlines()[0][:200]
        hub = (
            "local_files_only=True kept the Hugging Face hub from being asked"
            if local_files_only
            else "the Hugging Face hub could not be reached"
        )
        raise OSError(
            f"Could not get {repo!r}: {no_folder}, and as a hub id the local cache does not have it and {hub} "
            f"({reason}). {FOLDER_HINT}"
        ) from None


def read_json_file(path, kind=dict):
    """A checkpoint's JSON file: an object ({"key": value, ...}), or a list where `kind` says so (Sentence
    Transformers' modules.json); one that does not parse, or holds anything else, is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"{path} is not valid JSON ({e}): fix it, or fetch the checkpoint again.") from None
    if not isinstance(value, kind):
        names = {dict: 'a JSON object {"key": value, ...}', list: "a list", str: "a string", type(None): "null"}
        held = "true or false" if isinstance(value, bool) else names.get(type(value), "a number")
        raise ValueError(f"{path} holds {held}, not {names[kind]}: fix it, or fetch the checkpoint again.")
    return value


def read_safetensors(folder):
    """All tensors of a checkpoint folder, safetensors only: a pickle can run code, so none is opened."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(read_json_file(index)["weight_map"].values()))
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
            raise ValueError(
                f"Could not read {path}: the file is truncated or corrupt ({e}). Download it again."
            ) from e
    return tensors


BACKBONE_PARTS = ("embeddings", "layers", "final_norm")


def checkpoint_key(key, prefix):
    """A checkpoint key -> this class's: the backbone (under "model." in task checkpoints, bare in backbones) lands
    under `prefix` ("model." in task classes, "" in ModernBertModel); head keys keep their names."""
    base = key[len("model.") :] if key.startswith("model.") else key
    return prefix + base if base.split(".")[0] in BACKBONE_PARTS else key


def load_checkpoint(cls, folder, attn_implementation=None, dtype=None, device=None, **config_overrides):
    """A checkpoint folder into `cls`, strictly: every shape checked, a missing backbone weight an error; what was
    dropped (another task's head) or initialised fresh (a new classifier) is in `model.load_report` and a warning."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"No checkpoint at {folder!r}: it has no config.json.")
    d = read_json_file(config_path)
    if "num_labels" in config_overrides:  # a new label count replaces the checkpoint's label map
        d.pop("id2label", None), d.pop("label2id", None)
    config = ModernBertConfig.from_dict({**d, **config_overrides, "attn_implementation": attn_implementation})
    check_fits_in_memory(config)  # the weights are made on the CPU below, whatever the device asked for
    with torch.device("meta"):  # shapes only: no memory, and no random init of what the checkpoint overwrites
        model = cls(config)
    expected = model.state_dict()
    prefix = "" if cls is ModernBertModel else "model."
    tensors = {checkpoint_key(k, prefix): v for k, v in read_safetensors(folder).items()}
    # Walk our own keys, not the checkpoint's: every weight we need is accounted for, one way or another.
    report = {"dropped": sorted(set(tensors) - set(expected)), "initialised": [], "tied": []}
    to_load = {}
    for k, mine in expected.items():
        if k in tensors:
            if tensors[k].shape != mine.shape:
                raise ValueError(
                    f"Checkpoint weight {k} has shape {tuple(tensors[k].shape)}, but the config needs "
                    f"{tuple(mine.shape)}. Does config.json belong to these weights?"
                )
            to_load[k] = tensors[k]
        elif k == "decoder.weight" and config.tie_word_embeddings:
            to_load[k] = to_load[prefix + "embeddings.tok_embeddings.weight"]  # tied: stored once, as the embeddings
            report["tied"].append(k)
        elif k.removeprefix(prefix).split(".")[0] in BACKBONE_PARTS:
            raise ValueError(
                f"Checkpoint in {folder!r} lacks backbone weight {k!r}: refusing to run a half-loaded model."
            )
        else:
            report["initialised"].append(k)  # a head this checkpoint does not have (a new classifier)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty made a separate tensor for each name
    model.init_weights(only={k.rsplit(".", 1)[0] for k in report["initialised"]})  # official init, fresh heads only
    initialised = model.state_dict()
    to_load.update({k: initialised[k] for k in report["initialised"]})
    model.load_state_dict(to_load, strict=True)
    changed = {"dropped": report["dropped"], "initialised fresh": report["initialised"]}
    if said := "; ".join(f"{what} {keys}" for what, keys in changed.items() if keys):
        warnings.warn(f"{cls.__name__} from {folder}: {said}.", stacklevel=users_line())
    model.load_report = report
    return model.to(device=device, dtype=dtype).eval()


# The files a warning looks past to point at the user's line: this one, and those built on it (load.py, embed.py add
# themselves), so that load_model(...) and load_embedder(...) warn at the line that called them, as from_pretrained.
LIBRARY_FILES = {__file__}


def users_line():
    """warnings.warn's stacklevel for the first caller outside LIBRARY_FILES, so a warning points at the user's line
    (or, run as a script, at the script's own last line)."""
    frame, level = inspect.currentframe(), 0
    while frame.f_back is not None and frame.f_globals.get("__file__") in LIBRARY_FILES:
        frame, level = frame.f_back, level + 1
    return level


def save_checkpoint(model, folder):
    """Writes into a temporary folder beside `folder`, then moves the files into place: a save that fails halfway
    leaves nothing that looks like a checkpoint, and an earlier checkpoint there untouched."""
    from safetensors.torch import save_file

    folder = os.path.abspath(folder)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".saving-", dir=os.path.dirname(folder))
    try:
        # mkdtemp makes the folder private (0700), and safetensors its files: a checkpoint gets the modes any new
        # folder and file get under the umask, so others on a shared server can read it.
        umask = current_umask()
        os.chmod(staging, 0o777 & ~umask)
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            tensors.pop("decoder.weight", None)  # official checkpoints omit the tied copy
        save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        os.chmod(os.path.join(staging, "model.safetensors"), 0o666 & ~umask)
        config = {**model.config.to_dict(), "architectures": [type(model).__name__]}
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump({**config, "dtype": str(model.dtype).removeprefix("torch.")}, f, indent=2)
        if not os.path.exists(folder):
            os.replace(staging, folder)  # one rename: the folder appears whole or not at all
            return
        # Over an older checkpoint, one atomic step at a time, each leaving a folder that loads: the new weights
        # (an older index still wins over them), the index goes, the new config.json, last the old shards.
        shards = shard_files(folder)
        os.replace(os.path.join(staging, "model.safetensors"), os.path.join(folder, "model.safetensors"))
        if os.path.exists(index := os.path.join(folder, "model.safetensors.index.json")):
            os.remove(index)
        os.replace(os.path.join(staging, "config.json"), os.path.join(folder, "config.json"))
        for name in shards:
            os.remove(os.path.join(folder, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def shard_files(folder):
    """A sharded checkpoint's weight files in `folder`: those its index names, and any that a crashed save left
    without one (by transformers' names for them, model-00001-of-00003.safetensors)."""
    names = set(fnmatch.filter(os.listdir(folder), "model-*-of-*.safetensors"))
    try:
        names |= set(read_json_file(os.path.join(folder, "model.safetensors.index.json"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no index, or one that does not parse: the shards found by name
    # Files in this folder only, and never the new weights: an index may name anything.
    inside = (n for n in names if isinstance(n, str) and n == os.path.basename(n) and n != "model.safetensors")
    return sorted(n for n in inside if os.path.isfile(os.path.join(folder, n)))


def current_umask():
    """The process's umask, from /proc where Linux shows it: os.umask, which sets it to read it, changes it for every
    thread for a moment."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


# ----------------------------------------------------------------------------------------------------
# Input checks: a clear error for every malformed input, in one place so the forward path reads as the
# idea. Checks that read values (not only shapes) sync with the GPU, and a traced graph (torch.compile,
# torch.export) cannot raise on data, so they run only in eager mode: check inputs eagerly before compiling.


SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)
KIND_NAMES = {int: "an integer", bool: "true or false", str: "a string", dict: "a dict", list: "a list"}
# The float settings and the values each may take (LayerNorm divides by sqrt(variance + norm_eps): 0 makes NaN of a
# constant input, below 0 of most), then the numbers a RoPE scaling entry may hold.
FLOAT_RANGES = {
    "norm_eps": "above 0",
    "global_rope_theta": "above 0",
    "local_rope_theta": "above 0",
    "initializer_range": "0 or above",
    "initializer_cutoff_factor": "above 0",
    **dict.fromkeys(("attention_dropout", "embedding_dropout", "mlp_dropout", "classifier_dropout"), "in [0, 1]"),
}
ROPE_RANGES = {"factor": "above 0", "original_max_position_embeddings": "above 0", "attention_factor": "0 or above"}
ROPE_NUMBERS = (*ROPE_RANGES, "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
IN_RANGE = {"above 0": lambda v: v > 0, "0 or above": lambda v: v >= 0, "in [0, 1]": lambda v: 0 <= v <= 1}


def check_config_types(c):
    """Each value of the kind its field is annotated with, before anything computes with it: "768" is no size, and
    neither is True (an int to Python). Float settings wait for check_config: a rope_parameters entry may set one."""
    problems = []
    for f in fields(c):
        value, kinds = getattr(c, f.name), typing.get_args(f.type) or (f.type,)
        if float not in kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            problems.append(f"{f.name} must be {KIND_NAMES[kinds[0]]}, got {value!r} ({type(value).__name__})")
    for t in LAYER_TYPES if isinstance(c.rope_parameters, dict) else ():  # other keys: normalize_rope says so
        if not isinstance(rope := c.rope_parameters.get(t), (dict, type(None))):
            problems.append(f"rope_parameters[{t!r}] must be a dict, got {rope!r}")
    refuse_config(problems)


def check_config(c):
    check_attn_implementation(c.attn_implementation)
    # The sizes first: the checks below divide by them.
    refuse_config([f"{k} must be a positive integer, got {getattr(c, k)}" for k in SIZES if getattr(c, k) <= 0])
    problems = [number_problem(name, getattr(c, name), bound) for name, bound in FLOAT_RANGES.items()]
    for t, rope in c.rope_parameters.items():
        where, kind = f"rope_parameters[{t!r}]", rope["rope_type"]
        given = [k for k in ROPE_NUMBERS if rope.get(k) is not None]  # None: yarn computes its factors itself
        problems += [number_problem(f"{where}: {k}", rope[k], ROPE_RANGES.get(k)) for k in given]
        if kind not in SUPPORTED_ROPE_TYPES:
            problems.append(f"{where}: rope_type {kind!r} is not computed here; use {', '.join(SUPPORTED_ROPE_TYPES)}")
        elif kind != "default" and "factor" not in rope:
            problems.append(f"{where}: rope_type {kind!r} needs a factor")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            problems.append(f"{where}: partial_rotary_factor must be 1.0 (ModernBERT rotates whole heads)")
        if kind == "yarn" and rope.get("truncate", True) is not True:
            problems.append(f"{where}: truncate=False is ignored by transformers in a layer type's entry: remove it")
    if c.hidden_size % c.num_attention_heads:
        problems.append(f"hidden_size {c.hidden_size} is not divisible by num_attention_heads {c.num_attention_heads}")
    elif c.head_dim % 2:
        problems.append(f"head_dim {c.head_dim} is odd; RoPE rotates pairs of dimensions")
    if c.local_attention <= 0 or c.local_attention % 2:
        problems.append(
            f"local_attention {c.local_attention} must be a positive even total width (2 x the half-window)"
        )
    for name in ("hidden_activation", "classifier_activation"):
        if getattr(c, name) not in ACTIVATIONS:
            problems.append(f"{name} {getattr(c, name)!r} is not one of {sorted(ACTIVATIONS)}")
    if c.layer_types is None:
        problems.append(f"global_attn_every_n_layers {c.global_attn_every_n_layers} must be >= 1, or pass layer_types")
    elif len(c.layer_types) != c.num_hidden_layers or set(c.layer_types) - set(LAYER_TYPES):
        problems.append(f"layer_types must list {c.num_hidden_layers} of {LAYER_TYPES}, got {c.layer_types}")
    if c.classifier_pooling not in ("cls", "mean"):
        problems.append(f"classifier_pooling {c.classifier_pooling!r} must be 'cls' or 'mean'")
    refuse_config(problems)


def number_problem(name, value, bound=None):
    """What is wrong with a float setting, or None: not a finite number, or outside `bound` (a key of IN_RANGE)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    if bound is not None and not IN_RANGE[bound](value):
        return f"{name} must be {bound}, got {value}"


def refuse_config(problems):
    if problems := [p for p in problems if p]:
        raise ValueError("Invalid ModernBertConfig: " + "; ".join(problems) + ".")


def check_fits_in_memory(c):
    """Refuses a config whose weights alone would not fit in the memory free now, before a layer is built: built
    anyway, it takes memory until the system stops it. Weights are made in torch's default dtype, on the CPU."""
    if torch.get_default_device().type != "cpu":  # on meta nothing is held (load_checkpoint checks before its build)
        return
    count, dtype, available = parameter_count(c), torch.get_default_dtype(), available_memory()
    if available is not None and count * dtype.itemsize > available:
        raise ValueError(
            f"The weights alone would need about {count * dtype.itemsize / 1e9:,.1f} GB ({count:,} parameters in "
            f"{str(dtype).removeprefix('torch.')}), more than the {available / 1e9:,.1f} GB of memory available: make "
            f"the config smaller (num_hidden_layers {c.num_hidden_layers:,}, hidden_size {c.hidden_size:,}, "
            f"intermediate_size {c.intermediate_size:,}, vocab_size {c.vocab_size:,})."
        )


def parameter_count(c):
    """The parameters of a ModernBertForMaskedLM made from config c, from the shapes alone (the other classes differ
    by a head): the embeddings, each layer's attention and MLP, 2 L + 2 norms (layer 0 has no attn_norm), the head
    and the decoder (its weight the embeddings' when tied)."""
    h, i, v, layers = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    attention = 4 * h * h + 4 * h * c.attention_bias  # Wqkv (h, 3h), Wo (h, h)
    mlp = 3 * h * i + (2 * i + h) * c.mlp_bias  # Wi (h, 2i), Wo (i, h)
    norms = (2 * layers + 2) * h * (1 + c.norm_bias)
    head = h * h + h * c.classifier_bias + v * c.decoder_bias + (0 if c.tie_word_embeddings else v * h)
    return v * h + layers * (attention + mlp) + norms + head


def available_memory():
    """Bytes of memory free for new allocations now (Linux's MemAvailable counts the caches it can drop), or None
    where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name (macOS)
        return None


def check_attn_implementation(name):  # at each forward too: the name can change after the config is made
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {name!r} is unknown: use one of {ATTN_IMPLEMENTATIONS}")


def check_inputs(config, input_ids, attention_mask, inputs_embeds, packed, read_values=True):
    if unknown := sorted(set(packed) - set(PACKED_INPUTS)):
        raise TypeError(
            f"Unexpected keyword argument {unknown[0]!r}. ModernBERT models take input_ids, attention_mask, "
            f"inputs_embeds, labels, output_hidden_states, return_dict, and for packed input {PACKED_INPUTS}."
        )
    packed = {k: v for k, v in packed.items() if v is not None}
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    x = input_ids if input_ids is not None else inputs_embeds
    if input_ids is not None:
        dtype = getattr(input_ids, "dtype", type(input_ids))
        integer = isinstance(input_ids, torch.Tensor) and not (dtype.is_floating_point or dtype.is_complex)
        if not integer or dtype is torch.bool:
            raise TypeError(f"input_ids must be an integer tensor of token ids, got {dtype}.")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}.")
    elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
        raise ValueError(
            f"inputs_embeds must have shape (batch, seq_len, {config.hidden_size}), got {tuple(inputs_embeds.shape)}."
        )
    B, S = x.shape[:2]
    if B == 0 or S == 0:
        raise ValueError(
            f"Empty batch: input shape {tuple(x.shape)}. Pass at least one sequence of at least one token."
        )
    if packed:
        check_packed(packed, attention_mask, B, S, read_values)
    elif attention_mask is not None:
        if tuple(attention_mask.shape) != (B, S):
            got = tuple(attention_mask.shape)
            raise ValueError(f"attention_mask has shape {got} but the input has (batch, seq_len) = {(B, S)}.")
        if read_values and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token).")
    if read_values and input_ids is not None:
        low, high = torch.stack((input_ids.min(), input_ids.max())).tolist()
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, {config.vocab_size}) (the vocabulary), got values in [{low}, {high}]. "
                "Was the text tokenized with this model's tokenizer?"
            )


def check_length(config, longest):  # after packing, which knows the longest sequence
    if longest > config.max_position_embeddings:
        raise ValueError(
            f"A sequence has {longest} tokens, more than max_position_embeddings = "
            f"{config.max_position_embeddings}. Truncate it or split it into windows."
        )


def check_packed(packed, attention_mask, B, S, read_values):
    """Packed input: (1, T), no attention_mask, and every spelling of its boundaries agreeing with the others."""
    if attention_mask is not None or B != 1:
        raise ValueError(
            f"Packed input ({', '.join(packed)}) is input_ids of shape (1, T) with no attention_mask: the "
            "sequences back to back, their boundaries in cu_seqlens or position_ids."
        )
    if not {*BOUNDARY_KEYS, "position_ids"} & set(packed):
        raise ValueError(
            f"Packed input needs its boundaries: cu_seqlens, cu_seq_lens_q/k or position_ids, got {list(packed)}."
        )
    for name in ("position_ids", "seq_idx"):
        if name in packed and tuple(packed[name].shape) != (1, S):
            raise ValueError(f"{name} has shape {tuple(packed[name].shape)}, expected (1, {S}) like input_ids.")
    if not read_values:
        return
    bounds = {}  # name -> the sequence boundaries it gives
    for name in BOUNDARY_KEYS:
        if name in packed:
            cu = bounds[name] = torch.as_tensor(packed[name]).long().cpu()
            if cu.dim() != 1 or len(cu) < 2 or cu[0] != 0 or cu[-1] != S or (cu.diff() < 0).any():
                raise ValueError(f"{name} must rise from 0 to the packed length {S}, got {cu.tolist()}.")
    if "position_ids" in packed:
        pos = packed["position_ids"][0].long().cpu()
        if pos[0] != 0 or not ((pos[1:] == pos[:-1] + 1) | (pos[1:] == 0)).all():
            raise ValueError(
                "position_ids must count 0, 1, 2, ... in each packed sequence and restart at 0 at the next."
            )
        bounds["position_ids"] = position_starts(pos, S)
    (first, cu), *others = bounds.items()
    for name, other in others:
        if not torch.equal(cu, other):
            raise ValueError(f"The packed boundaries disagree: {first} gives {cu.tolist()}, {name} {other.tolist()}.")
    longest = int(cu.diff().max())
    for name in ("max_length_q", "max_length_k"):
        if name in packed and int(packed[name]) < longest:
            raise ValueError(f"{name} = {int(packed[name])} is below the longest packed sequence, {longest} tokens.")
    if "seq_idx" in packed:
        numbered = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff())
        if not torch.equal(packed["seq_idx"][0].long().cpu(), numbered):
            raise ValueError("seq_idx does not number the packed sequences 0, 1, 2, ... as their boundaries say.")


def check_question_answering_labels(config):
    if config.num_labels != 2:
        raise ValueError(f"Question answering needs num_labels = 2 (start, end), the config has {config.num_labels}.")


def check_labels(labels, shape, name="labels"):
    if labels is not None and tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(labels.shape)}, expected {tuple(shape)}.")


def check_token_labels(labels, packing, ignore_index):
    check_labels(labels, packing.input_shape)
    if bool((labels[~packing.attention_mask()] != ignore_index).any()):
        raise ValueError(
            f"labels at padded positions must be {ignore_index} (ignored): those positions have no output."
        )


def check_poolable(packing):
    lengths = packing.cu_seqlens.diff()
    if bool((lengths == 0).any()):
        raise ValueError(
            f"Row {int((lengths == 0).nonzero()[0])} of attention_mask is all zeros: there is nothing to "
            "classify. Drop empty rows."
        )


def check_multiple_choice(input_ids, attention_mask, labels, inputs):
    """The (batch, num_choices, seq_len) of a multiple-choice input, checked."""
    if unknown := sorted(set(inputs) - {"inputs_embeds", "output_hidden_states"}):
        raise TypeError(
            f"Unexpected keyword argument {unknown[0]!r}. Multiple choice takes input_ids (or inputs_embeds), "
            "attention_mask, labels, output_hidden_states and return_dict; packed input does not apply."
        )
    inputs_embeds = inputs.get("inputs_embeds")
    x = input_ids if input_ids is not None else inputs_embeds
    if x is None or x.dim() != (3 if input_ids is not None else 4):
        got = None if x is None else tuple(x.shape)
        raise ValueError(f"Multiple choice takes input_ids of shape (batch, num_choices, seq_len), got {got}.")
    B, C, S = x.shape[:3]
    if attention_mask is not None and tuple(attention_mask.shape) != (B, C, S):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, C, S)}.")
    check_labels(labels, (B,))
    return B, C, S
