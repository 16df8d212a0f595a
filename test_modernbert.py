"""Tests of modernbert.py against the official implementation (transformers), piece by piece in the file's
order, then the whole model, then the plumbing.

- Golden files (fixtures/, written by fixtures/make_fixtures.py from transformers) need only
  requirements.txt: every layer's hidden states, every head's logits and loss, both config formats,
  both poolings, 300+ tokens with a window that bites, ragged right and left padding, through the
  production loader and every attention kernel.
- Live tests (where transformers is importable; CI installs it) compare random configs, gradients,
  kernels and state-dict exchange directly.
- Wrong variants (tanh GELU, swapped theta, window off by one, a norm on layer 0, RMSNorm) must fail
  the same comparisons: that is what shows the comparisons can fail.
- `-m gpu` runs the real flash kernel where CUDA exists; `-m hub` checks the official golden values
  on the real checkpoints where the internet exists. Both are skipped here, saying why.
- Compiling, export, ONNX, DDP, the Trainer, subprocesses and seed sweeps are marked slow: `pytest --slow`.

Padded positions: our outputs hold zeros there, the official ones hold whatever the model computed
for padding, so padded batches are compared on real tokens only.
"""

import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import modernbert as mb
from conftest import (
    HERE,
    HOSTILE_CONFIGS,
    NOT_AN_OBJECT,
    SHARED_DATA,
    TEXTS,
    TOO_BIG,
    WORD_TINY,
    address_space_limit,
    assert_close,
    needs_gpu,
    needs_proc,
    needs_tokenizer,
    needs_transformers,
    not_an_object_message,
    too_big_message,
    transformers,
    with_config,
    within_official_error,
)
from load import fill_mask, load_model, load_tokenizer, tokenize

FIXTURES = os.path.join(HERE, "fixtures")
CASES = sorted(d for d in os.listdir(FIXTURES) if os.path.isfile(os.path.join(FIXTURES, d, "io.safetensors")))
IMPLS = ["eager", "sdpa", "flash_attention_2", "flex_attention"]  # flash runs here through the stand-in kernel below
# the kernels a test loops over: flex on a CPU needs torch 2.13 (its tests by name skip, saying so, in conftest.py)
LOOPED_IMPLS = [i for i in IMPLS if i != "flex_attention" or mb.FLEX_ON_CPU or torch.cuda.is_available()]
FP32_TOL = 2e-4  # outputs are O(1)-O(10); fp32 rounding of the two implementations differs by ~1e-5

# ----------------------------------------------------------------------------------------------------
# A plain-torch stand-in for flash_attn_varlen_func, written from its documentation: q, k, v are
# (total_tokens, H, D) in fp16/bf16, sequences are cut at cu_seqlens, window_size=(left, right) is
# inclusive on both sides (-1: unlimited). It lets the flash path's plumbing (packing, cu_seqlens,
# window arithmetic, dtype casts) run on this CPU; `-m gpu` runs the real kernel.


def flash_varlen_standin(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    window_size=(-1, -1),
):
    assert q.dtype in (torch.float16, torch.bfloat16), f"flash kernels take fp16/bf16, got {q.dtype}"
    assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    assert max_seqlen_q == max_seqlen_k == max(lengths)
    left, right = window_size
    out = torch.empty_like(q)
    for start, n in zip(cu_seqlens_q[:-1].tolist(), lengths):
        qs, ks, vs = (t[start : start + n].float().transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        scores = qs @ ks.transpose(-2, -1) * softmax_scale
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        allowed = ((j >= i - left) | (left < 0)) & ((j <= i + right) | (right < 0))
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[start : start + n] = (scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
    return out


@pytest.fixture
def flash_standin(monkeypatch):
    calls = []

    def kernel(device):
        def recorded(*args, **kwargs):
            calls.append(kwargs["window_size"])
            return flash_varlen_standin(*args, **kwargs)

        return recorded

    monkeypatch.setattr(mb, "find_flash_kernel", kernel)
    return calls


# ----------------------------------------------------------------------------------------------------
# Models to test: the golden files' checkpoints, the official model beside ours with the same weights, and
# small random ones


def load_case(name, impl="sdpa", dtype=None):
    from safetensors.torch import load_file

    folder = os.path.join(FIXTURES, name)
    arch = json.load(open(os.path.join(folder, "config.json")))["architectures"][0]
    model = getattr(mb, arch).from_pretrained(folder, attn_implementation=impl, dtype=dtype)
    io = load_file(os.path.join(folder, "io.safetensors"))
    inputs = {k: v for k, v in io.items() if not k.startswith("expected_")}
    expected = {k[len("expected_") :]: v for k, v in io.items() if k.startswith("expected_")}
    return model, inputs, expected


def compare_case(model, inputs, expected, tol, where, relative=False):
    """Run the model and compare every recorded official output; real tokens only. With relative,
    tol is a fraction of the largest official value (for half-precision paths)."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    mask = inputs["attention_mask"].bool()
    for key, ref in expected.items():
        if key.startswith("hidden_states."):
            ours = out.hidden_states[int(key.split(".")[1])]
        else:
            ours = getattr(out, key)
        if ours.shape[:2] == mask.shape and key != "loss" and not isinstance(model, mb.ModernBertForMultipleChoice):
            ours, ref = ours[mask], ref[mask]  # per-token outputs: real tokens only
        assert_close(ours.float(), ref, tol * ref.abs().max().item() if relative else tol, f"{where} {key}")


def official_and_ours(cls_name, seed=0, **overrides):
    """The official model with weights that make every layer count, and ours holding the same weights."""
    from fixtures.make_fixtures import build

    official = build(cls_name, seed, **overrides)
    ours = getattr(mb, cls_name)(mb.ModernBertConfig.from_dict(official.config.to_dict())).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    return official, ours


def ragged_batch(config, lengths, left=(), seq=None, seed=0):
    from fixtures.make_fixtures import ragged_mask, random_batch

    seq = seq or max(lengths)
    mask = ragged_mask(len(lengths), seq, lengths, [i in left for i in range(len(lengths))])
    return random_batch(config, mask, seed), mask


HEAD_CASES = {
    "ModernBertForMaskedLM": dict(),
    "ModernBertForSequenceClassification": dict(num_labels=3, classifier_pooling="mean"),
    "ModernBertForTokenClassification": dict(num_labels=4),
    "ModernBertForQuestionAnswering": dict(num_labels=2),
    "ModernBertForMultipleChoice": dict(classifier_pooling="cls"),
}


@pytest.fixture(scope="module")
def small():
    config = mb.ModernBertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        local_attention=8,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return {cls: getattr(mb, cls)(config).eval() for cls in ["ModernBertModel"] + sorted(HEAD_CASES)}


EDGE = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4)


def edge_model(cls_name, **config):
    torch.manual_seed(0)
    return getattr(mb, cls_name)(mb.ModernBertConfig(**EDGE, local_attention=8, pad_token_id=0, **config)).eval()


# ----------------------------------------------------------------------------------------------------
# Config: ModernBertConfig, config.json in both official formats (config_from_dict, config_to_dict), check_config


def test_config_reads_both_official_formats():
    for name, layers, hidden in (("modernbert-base", 22, 768), ("modernbert-large", 28, 1024)):
        path = SHARED_DATA / name / "config.json"
        if not os.path.exists(path):
            pytest.skip(f"{path} is not here (CI puts ../shared beside the checkout)")
        c = mb.ModernBertConfig.from_dict(json.load(open(path)))  # v4: global_attn_every_n_layers, thetas
        assert (c.num_hidden_layers, c.hidden_size, c.classifier_pooling) == (layers, hidden, "mean")
        assert c.layer_types[:4] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
        v5 = mb.ModernBertConfig.from_dict(c.to_dict())  # v5 spelling round trip
        assert v5 == c
    v5 = mb.ModernBertConfig.from_dict(
        {
            "layer_types": ["sliding_attention", "full_attention"],
            "num_hidden_layers": 2,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 5.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 7.0},
            },
            "id2label": {"0": "neg", "1": "neu", "2": "pos"},
            "reference_compile": True,
        }
    )
    assert (v5.global_rope_theta, v5.local_rope_theta, v5.num_labels, v5.id2label[2]) == (5.0, 7.0, 3, "pos")
    assert not v5.is_global(0) and v5.is_global(1)
    with pytest.raises(ValueError, match="rope_type 'yarn' needs a factor"):
        mb.ModernBertConfig.from_dict(
            {"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1.0}}}
        )


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(hidden_size=30, num_attention_heads=4), "not divisible"),
        (dict(local_attention=127), "even"),
        (dict(hidden_activation="gelu_fast"), "hidden_activation 'gelu_fast' is not one of"),
        (dict(classifier_pooling="max"), "classifier_pooling"),
        (dict(num_hidden_layers=2, layer_types=["full_attention"]), "layer_types must list 2"),
        (dict(vocab_size=0), "positive"),
    ],
)
def test_impossible_configs_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        mb.ModernBertConfig(**bad)


def test_global_attention_every_zero_layers_is_a_clear_error():
    """transformers divides by it (ZeroDivisionError); a config error naming the field does better. A v5 config,
    whose layer_types say which layers are global, does not read it."""
    with pytest.raises(ValueError, match="global_attn_every_n_layers"):
        mb.ModernBertConfig(global_attn_every_n_layers=0)
    with pytest.raises(ValueError, match="global_attn_every_n_layers"):
        mb.ModernBertConfig.from_dict({"global_attn_every_n_layers": 0})
    pattern = ["full_attention", "sliding_attention", "sliding_attention"]
    assert mb.ModernBertConfig(**EDGE, layer_types=pattern, global_attn_every_n_layers=0).layer_types == pattern


@needs_transformers
def test_num_labels_set_after_the_config_is_made_saves_and_loads(tmp_path):
    """transformers' idiom, config.num_labels = 3 after the config is made: the label map follows, so the saved
    folder loads again, here and in transformers."""
    official = transformers.ModernBertConfig(**EDGE, local_attention=8, pad_token_id=0)
    official.num_labels = 3
    config = mb.ModernBertConfig(**EDGE, local_attention=8, pad_token_id=0)
    config.num_labels = 3
    assert config.id2label == official.id2label and config.label2id == official.label2id
    mb.ModernBertForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    again = mb.ModernBertForSequenceClassification.from_pretrained(tmp_path / "clf")
    assert again.config.num_labels == 3 and again.classifier.weight.shape == (3, 32)
    theirs = transformers.ModernBertForSequenceClassification.from_pretrained(tmp_path / "clf")
    assert theirs.config.num_labels == 3


# ----------------------------------------------------------------------------------------------------
# Hostile config.json files: each a one-line error naming the key, the value and the kind wanted (load.py's doors and
# command line: test_load.py); a config too big for memory is refused before a layer is built; every real one loads.


@pytest.mark.parametrize("change, message", HOSTILE_CONFIGS.values(), ids=HOSTILE_CONFIGS.keys())
def test_a_hostile_config_is_one_line_naming_the_key_and_value(word_checkpoint, tmp_path, change, message):
    folder = with_config(word_checkpoint, tmp_path, change)
    for load_it in (mb.ModernBertConfig.from_pretrained, mb.ModernBertForMaskedLM.from_pretrained):
        with pytest.raises(ValueError, match=rf"^Invalid ModernBertConfig: .*{message}") as e:
            load_it(folder)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=message):  # the same check for a config made in Python
        mb.ModernBertConfig.from_dict({**WORD_TINY, **change})


@pytest.mark.parametrize("value, shown", NOT_AN_OBJECT)
def test_a_config_json_that_is_not_an_object_is_named(word_checkpoint, tmp_path, value, shown):
    folder = with_config(word_checkpoint, tmp_path, value)
    for load_it in (mb.ModernBertConfig.from_pretrained, mb.ModernBertForMaskedLM.from_pretrained):
        with pytest.raises(ValueError, match=f"^{not_an_object_message(folder, shown)}"):
            load_it(folder)


@needs_proc
@pytest.mark.parametrize("change, key", TOO_BIG.values(), ids=TOO_BIG.keys())
def test_a_config_too_big_for_memory_is_refused_before_building(word_checkpoint, tmp_path, change, key):
    folder = with_config(word_checkpoint, tmp_path, change)
    config = mb.ModernBertConfig.from_pretrained(folder)  # the config alone is fine: nothing is built
    message = too_big_message(config)
    with address_space_limit(2 * 2**30):
        with pytest.raises(ValueError, match=f"^{message}.*{key}"):
            mb.ModernBertForMaskedLM(config)
        with pytest.raises(ValueError, match=f"^{message}"):
            mb.ModernBertForMaskedLM.from_pretrained(folder)


@pytest.mark.parametrize(
    "change",
    [
        {},
        dict(tie_word_embeddings=False),
        dict(attention_bias=True, mlp_bias=True, norm_bias=True, classifier_bias=True),
    ],
    ids=["tied", "untied", "every-bias"],
)
def test_the_parameter_estimate_is_the_masked_lm_parameter_count(change):
    config = mb.ModernBertConfig(**{**WORD_TINY, **change})
    assert mb.parameter_count(config) == mb.ModernBertForMaskedLM(config).num_parameters()


def test_the_memory_check_compares_with_the_memory_available(monkeypatch):
    config = mb.ModernBertConfig(**WORD_TINY)
    need = 4 * mb.parameter_count(config)
    monkeypatch.setattr(mb, "available_memory", lambda: need - 1)
    with pytest.raises(
        ValueError, match=r"would need about 0.0 GB \(.* parameters in float32\), more than the 0.0 GB"
    ):
        mb.ModernBertForMaskedLM(config)
    monkeypatch.setattr(mb, "available_memory", lambda: need)
    mb.ModernBertForMaskedLM(config)
    monkeypatch.setattr(mb, "available_memory", lambda: None)  # not known here: no check
    mb.ModernBertForMaskedLM(config)
    monkeypatch.setattr(mb, "available_memory", lambda: 0)
    with torch.device("meta"):  # shapes only: nothing to hold
        mb.ModernBertForMaskedLM(config)


def test_available_memory_is_read_where_the_system_says_it():
    memory = mb.available_memory()
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            said = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        assert abs(memory - said) < 2**30  # read a moment apart
    else:
        assert memory is None or memory > 0


def real_configs():
    """Every config.json this checkout can see: the official ones in shared/data and the golden fixtures'."""
    paths = sorted(SHARED_DATA.glob("*/config.json")) + sorted(Path(FIXTURES).glob("*/config.json"))
    return {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text()) for p in paths}


# Released configs' values where they differ from the defaults, as their model cards and config.json files give
# them: mmBERT (Gemma's vocabulary and ids, 160000 on local layers too), Ettin's smallest, Granite R2 (a
# transformers 4 key, layer_norm_eps, that both readers ignore), a 32K YaRN checkpoint, and nulls and ints where
# floats are usual.
RELEASED = {
    "mmbert-base": dict(
        vocab_size=256000, local_rope_theta=160000, pad_token_id=0, bos_token_id=2, cls_token_id=2, eos_token_id=1
    ),
    "ettin-encoder-17m": dict(hidden_size=256, intermediate_size=384, num_hidden_layers=7, num_attention_heads=4),
    "granite-r2": dict(
        vocab_size=262152, layer_norm_eps=1e-12, pad_token_id=0, global_rope_theta=150000.0, local_rope_theta=160000.0
    ),
    "yarn-32k": dict(
        max_position_embeddings=32768,
        global_rope_theta=160000,
        rope_scaling=dict(
            rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=8192
        ),
    ),
    "null-scaling": dict(rope_scaling=None, classifier_dropout=0, attention_dropout=0),
}


def test_every_real_config_still_loads():
    configs = {**real_configs(), **RELEASED}
    assert len(configs) >= len(RELEASED) + 9, sorted(configs)  # the golden fixtures at least
    for name, d in configs.items():
        config = mb.ModernBertConfig.from_dict(d)
        assert mb.ModernBertConfig.from_dict(config.to_dict()) == config, name
        assert mb.parameter_count(config) < 10**9, name  # none is refused by the memory check on a laptop


@pytest.mark.slow  # imports transformers
@needs_transformers
def test_transformers_accepts_what_we_accept_among_the_real_configs():
    for name, d in {**real_configs(), **RELEASED}.items():
        theirs = transformers.ModernBertConfig.from_dict(d)
        ours = mb.ModernBertConfig.from_dict(d)
        assert (ours.num_hidden_layers, ours.hidden_size, ours.norm_eps) == (
            theirs.num_hidden_layers,
            theirs.hidden_size,
            theirs.norm_eps,
        ), name


# ----------------------------------------------------------------------------------------------------
# RoPE: rope_frequencies, rope_tables, rotate_half, apply_rope (and rope_in_chunks, its CPU half-precision path)


def test_rope_in_bf16_uses_fp32_tables_at_long_positions():
    """Rotating bf16 q/k at positions up to 8191 must equal the fp32 rotation rounded once to bf16.
    The same check with bf16 cos/sin tables fails: that is the bug some ports shipped."""
    positions = torch.arange(0, 8192, 7)
    x = torch.randn(len(positions), 2, 64).bfloat16()  # (T, H, D)
    cos, sin = mb.rope_tables(*mb.rope_frequencies(mb.ModernBertConfig(), "full_attention"), positions)
    assert cos.dtype == sin.dtype == torch.float32
    exact = mb.apply_rope(x.float(), cos, sin)
    ulp = exact.abs().clamp(min=1e-3) * 2**-7  # one bf16 step
    ours = mb.apply_rope(x, cos, sin)
    assert ours.dtype == torch.bfloat16 and ((ours.float() - exact).abs() <= ulp).all()
    bf16_tables = mb.apply_rope(x, cos.bfloat16().float(), sin.bfloat16().float())
    assert not ((bf16_tables.float() - exact).abs() <= ulp).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_in_chunks_equals_rope_in_one_pass(dtype):
    """rope_in_chunks (half precision on a CPU) runs ROPE_CHUNK tokens at a time: the same numbers and gradients as
    apply_rope's one pass, for q and k as the attention layer passes them (strided in Wqkv's output), two chunks and
    a short one."""
    T = 600
    qkv = torch.randn(T, 3, 4, 64, dtype=dtype, requires_grad=True)  # (T, 3, H, D)
    cos, sin = mb.rope_tables(*mb.rope_frequencies(mb.ModernBertConfig(), "full_attention"), torch.arange(T) % 300)
    chunked = mb.rope_in_chunks(qkv[:, :2], cos, sin)
    whole = mb.apply_rope(qkv[:, :2], cos, sin)
    assert chunked.dtype == dtype and torch.equal(chunked, whole)
    grads = [torch.autograd.grad(out.float().square().sum(), qkv)[0] for out in (whole, chunked)]
    assert torch.equal(*grads)


# three layers over 2 * ROPE_CHUNK + 50 tokens: long enough for rope_in_chunks to cut
ROPE_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2)


@pytest.mark.parametrize(
    "dtype, autocast, chunked",
    [
        (torch.bfloat16, False, True),
        (torch.float16, False, True),
        (torch.float32, True, True),
        (torch.float32, False, False),
    ],
    ids=["bf16", "fp16", "fp32-under-bf16-autocast", "fp32"],
)
def test_rope_is_chunked_exactly_for_half_precision_on_a_cpu(dtype, autocast, chunked, monkeypatch):
    """encode chooses RoPE in pieces once a forward, from the dtype the layers compute in (autocast's, not the hidden
    states'): half precision on a CPU, and never in fp32. The pieces give the numbers of one pass."""
    torch.manual_seed(0)
    model = mb.ModernBertModel(mb.ModernBertConfig(**ROPE_TINY)).to(dtype).eval()
    ids = torch.randint(1, 64, (2, mb.ROPE_CHUNK + 50))
    calls, real = [], mb.rope_in_chunks
    monkeypatch.setattr(mb, "rope_in_chunks", lambda x, cos, sin: calls.append(x.dtype) or real(x, cos, sin))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids).last_hidden_state
        assert len(calls) == (ROPE_TINY["num_hidden_layers"] if chunked else 0), calls
        monkeypatch.setattr(mb, "rope_in_chunks", mb.apply_rope)  # one pass, the same numbers
        assert torch.equal(out, model(ids).last_hidden_state)


def test_rope_in_chunks_is_one_pass_when_short():
    x = torch.randn(mb.ROPE_CHUNK, 2, 4, 64, dtype=torch.bfloat16)  # (T, 2, H, D): q and k
    cos, sin = mb.rope_tables(*mb.rope_frequencies(mb.ModernBertConfig(), "full_attention"), torch.arange(x.shape[0]))
    assert torch.equal(mb.rope_in_chunks(x, cos, sin), mb.apply_rope(x, cos, sin))


# ----------------------------------------------------------------------------------------------------
# Unpadding: unpad, pad, Packing. A row's numbers do not depend on its padding (left, right, holes), on the
# other rows of its batch, or on being packed; padded positions are zeros.


@pytest.mark.parametrize("impl", IMPLS)
def test_a_row_gives_the_same_numbers_alone_batched_packed_and_padded_either_side(impl, flash_standin):
    model, inputs, _ = load_case("model", impl)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).last_hidden_state
        rows = [ids[i][mask[i].bool()] for i in range(len(ids))]
        alone = [model(r[None]).last_hidden_state[0] for r in rows]
        packed = model(
            torch.cat(rows)[None], cu_seqlens=torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
        ).last_hidden_state[0]
        flipped = torch.zeros_like(mask)  # right padding <-> left padding
        flipped_ids = torch.full_like(ids, model.config.pad_token_id)
        for i, r in enumerate(rows):
            if mask[i, 0]:
                flipped[i, -len(r) :], flipped_ids[i, -len(r) :] = 1, r
            else:
                flipped[i, : len(r)], flipped_ids[i, : len(r)] = 1, r
        other = model(flipped_ids, attention_mask=flipped).last_hidden_state
    tol = 0.05 if impl == "flash_attention_2" else 1e-4
    for i, r in enumerate(alone):
        assert_close(batch[i][mask[i].bool()], r, tol, f"{impl}: row {i} in the batch vs alone")
        assert_close(other[i][flipped[i].bool()], r, tol, f"{impl}: row {i} with its padding flipped")
    assert_close(packed, torch.cat(alone), tol, f"{impl}: packed vs alone")
    assert (batch[~mask.bool()] == 0).all(), "padded positions hold zeros"


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_holes_are_removed_like_padding(small, impl, flash_standin):
    """Tokens either side of a hole in the attention_mask are neighbours, in RoPE and in the window. The
    weights are made loud (as the golden files' are): at the default init, RoPE positions that keep the
    hole's width change the outputs by only ~1e-5."""
    torch.manual_seed(0)
    model = mb.ModernBertForTokenClassification(small["ModernBertModel"].config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, p.shape[-1] ** -0.5)
    model.config.attn_implementation = impl
    try:
        ids = torch.randint(1, 64, (1, 30), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(1, 30, dtype=torch.long)
        mask[0, 10:16] = 0  # a hole of 6, wider than the +-4 window
        with torch.no_grad():
            holed = model(ids, attention_mask=mask).logits[mask.bool()]
            closed = model(ids[mask.bool()][None]).logits[0]
    finally:
        model.config.attn_implementation = None
    assert_close(holed, closed, 1e-2 if impl == "flash_attention_2" else 1e-5, f"{impl}: hole vs no hole")


@pytest.mark.parametrize("impl", IMPLS)
def test_an_all_padding_row_gives_zeros_and_leaves_the_other_rows_alone(small, impl, flash_standin):
    """A row whose mask is all zeros: the encoder returns zeros for it and the same numbers for the
    other rows; a classifier has nothing to pool and says so."""
    ids = torch.randint(1, 64, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1] = 0
    model = small["ModernBertModel"]
    model.config.attn_implementation = impl
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=mask).last_hidden_state
            alone = model(ids[[0, 2]]).last_hidden_state
            nothing = model(ids, attention_mask=torch.zeros_like(mask)).last_hidden_state
        assert (out[1] == 0).all() and (nothing == 0).all()
        assert_close(out[[0, 2]], alone, 0.05 if impl == "flash_attention_2" else 1e-5, "rows beside an empty row")
        with pytest.raises(ValueError, match="Row 1 of attention_mask is all zeros"), torch.no_grad():
            small["ModernBertForSequenceClassification"](ids, attention_mask=mask)
    finally:
        model.config.attn_implementation = None


@pytest.mark.parametrize("impl", IMPLS)
def test_no_non_finite_values_for_any_mask_pattern(small, impl, flash_standin):
    """Random masks, holes in the middle included, single-token rows and rows whose window is all
    padding: every output is finite, and padded positions are zero."""
    g = torch.Generator().manual_seed(1)
    for cls_name in ["ModernBertForMaskedLM", "ModernBertForTokenClassification", "ModernBertForQuestionAnswering"]:
        model = small[cls_name]
        model.config.attn_implementation = impl
        for trial in range(4):
            mask = (torch.rand(4, 50, generator=g) < [0.9, 0.5, 0.1, 0.02][trial]).long()
            mask[:, 0] = 1  # (a row with nothing is covered above)
            mask[3] = 0
            mask[3, 40] = 1  # one real token, far from the others
            ids = torch.randint(0, 64, (4, 50), generator=g)
            with torch.no_grad():
                out = model(ids, attention_mask=mask)
            for name in ("logits", "start_logits", "end_logits"):
                t = getattr(out, name)
                if t is not None:
                    assert torch.isfinite(t).all(), f"{cls_name}/{impl}: non-finite {name}"
                    assert (t[mask == 0] == 0).all()
        model.config.attn_implementation = None


def test_packing_names_its_two_shapes_apart_under_left_padding():
    """padded_seq_index places tokens in (N, max_seqlen), one right-padded row a sequence; to_input_shape puts them
    back where the input had them, (B, S), left padding included. Under left padding the two differ."""
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    packing = mb.Packing.from_mask(mask)
    tokens = torch.arange(1, 6)  # the packed stream: 1, 2 (row 0), 3, 4, 5 (row 1)
    by_sequence = mb.pad(tokens, packing.padded_seq_index, packing.num_seqs, packing.max_seqlen)
    assert by_sequence.tolist() == [[1, 2, 0], [3, 4, 5]]
    assert packing.to_input_shape(tokens).tolist() == [[0, 0, 1, 2], [3, 4, 5, 0]]


def test_cu_seqlens_from_lengths():
    cu = mb.cu_seqlens_from_lengths(torch.tensor([3, 0, 5]))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 8]
    assert mb.cu_seqlens_from_lengths([2, 2]).tolist() == [0, 2, 4]  # a list, as train.py has its lengths
    assert torch.equal(mb.Packing.from_mask(torch.tensor([[1, 1, 1], [1, 0, 0]])).cu_seqlens, torch.tensor([0, 3, 4]))


# ----------------------------------------------------------------------------------------------------
# Attention kernels: eager, sdpa, local_block_attention, flash (the stand-in above), flex; and
# attention_kernels, which picks one by name, device, dtype and packing


def random_packed(lengths, heads=3, dim=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, heads, dim, generator=g).to(dtype) for _ in range(3))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return q, k, v, mb.packing_from_cu_seqlens(cu, None, T)


def test_eager_kernel_is_the_textbook_formula():
    """eager_attention on one sequence equals softmax(Q K^T / sqrt(D) + band mask) V by hand."""
    q, k, v, packing = random_packed([40], heads=2, dim=8)
    i = torch.arange(40)
    scores = torch.einsum("qhd,khd->hqk", q, k) / 8**0.5
    scores = scores.masked_fill((i[:, None] - i[None, :]).abs() > 5, float("-inf"))
    assert_close(
        mb.eager_attention(q, k, v, packing, 5), torch.einsum("hqk,khd->qhd", scores.softmax(-1), v), 1e-5, "eager"
    )


@pytest.mark.parametrize("window", [None, 1, 4, 16, 64])
@pytest.mark.parametrize("lengths", [[1], [5, 130, 1, 64, 65, 66, 200], [300, 0, 17]])
def test_every_kernel_equals_eager_on_ragged_packed_sequences(lengths, window, flash_standin):
    q, k, v, packing = random_packed(lengths)
    ref = mb.eager_attention(q, k, v, packing, window)
    assert_close(mb.sdpa_attention(q, k, v, packing, window), ref, 1e-5, f"sdpa window={window}")
    assert_close(
        mb.local_block_attention(q, k, v, packing, window or 8),
        mb.eager_attention(q, k, v, packing, window or 8),
        1e-5,
        "blocked local",
    )
    # bf16-exact inputs, so the flash path's cast loses nothing and only its bf16 output rounds
    qb, kb, vb = (t.bfloat16().float() for t in (q, k, v))
    varlen = mb.find_flash_kernel(qb.device)  # flash_standin's
    assert_close(
        mb.flash_attention(qb, kb, vb, packing, window, varlen=varlen),
        mb.eager_attention(qb, kb, vb, packing, window),
        2e-2,
        f"flash window={window}",
    )
    assert mb.flash_attention(qb, kb, vb, packing, window, varlen=varlen).dtype == torch.float32  # cast back
    if mb.FLEX_ON_CPU:
        assert_close(mb.flex_attention(q, k, v, packing, window), ref, 1e-5, f"flex window={window}")  # (q: no grad)
    elif q.shape[0] >= 128:  # older releases' CPU kernel aborts the process: a one-line error instead
        with pytest.raises(RuntimeError, match=r"FlexAttention on a CPU needs torch >= 2\.13"):
            mb.flex_attention(q, k, v, packing, window)


def flex_layouts():
    """Packings flex must serve: packed streams (one token, tiles cut mid-sequence, an empty sequence, long
    ones), and the traced path's grid with left padding, right padding and a hole."""
    mask = torch.ones(3, 300, dtype=torch.long)
    mask[0, 250:], mask[1, :40], mask[2, 100:120] = 0, 0, 0
    return {
        "one token": mb.packing_from_cu_seqlens(torch.tensor([0, 1]), None, 1),
        "ragged": mb.packing_from_cu_seqlens(torch.tensor([0, 5, 128, 135, 136, 256, 265, 331, 531]), None, 531),
        "empty sequence": mb.packing_from_cu_seqlens(torch.tensor([0, 300, 300, 317]), None, 317),
        "traced grid": mb.pack_for_tracing(mask),
    }


@pytest.mark.parametrize("window", [None, pytest.param(1, marks=pytest.mark.slow), 64, 200])  # 64 < a tile < 200
@pytest.mark.parametrize("layout", ["one token", "ragged", "empty sequence", "traced grid"])
def test_flex_block_mask_visits_every_tile_the_rule_needs(layout, window):
    """flex_block_mask finds its tiles from the layout, without evaluating the rule on T x T pairs: they must
    be the tiles where torch's create_block_mask (which does evaluate it) finds an allowed pair, and no more,
    except on the traced grid, whose runs may also cover tiles of nothing but padding keys."""
    from torch.nn.attention.flex_attention import create_block_mask

    packing = flex_layouts()[layout]
    T = packing.indices.shape[0]
    ours = mb.flex_block_mask(packing, window)
    truth = create_block_mask(ours.mask_mod, 1, 1, T, T, device="cpu", BLOCK_SIZE=mb.FLEX_BLOCK).to_dense().bool()
    mine = ours.to_dense().bool()
    assert (mine >= truth).all(), f"{layout}: a tile with an allowed pair is skipped"
    if layout != "traced grid":
        assert torch.equal(mine, truth), f"{layout}: tiles visited that hold no allowed pair"
    q, k, v = (torch.randn(T, 2, 8) for _ in range(3))
    with torch.no_grad():  # real queries: what padding queries get is never used (repad zeroes it)
        out, ref = (
            kernel(q, k, v, packing, window)[packing.is_real] for kernel in (mb.flex_attention, mb.eager_attention)
        )
    assert_close(out, ref, 1e-5, f"flex on {layout}")


def test_flex_attention_on_a_cpu_in_eval_mode_needs_no_torch_no_grad(small):
    """model.eval(); model(x): nobody asked for a backward pass, so none must be needed."""
    model = small["ModernBertModel"]
    mask = torch.tensor([[1] * 30, [1] * 18 + [0] * 12])
    ids = torch.randint(1, 64, mask.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
    model.config.attn_implementation = "flex_attention"
    try:
        out = model(ids, attention_mask=mask).last_hidden_state
    finally:
        model.config.attn_implementation = None
    assert_close(out.detach(), ref, 1e-5, "flex, eval mode, grad enabled")


def test_forced_flash_precision_does_not_depend_on_the_batch(flash_standin):
    """flash_attention_2 forced on an fp32 model: every global layer ran in fp32 when all lengths were equal and
    in bf16 (the flash kernel's precision) when they were ragged. The same sequence must come out as precise in
    either batch: its error against fp32 eager attention of the same order (or both at fp32 rounding)."""
    from fixtures.make_fixtures import make_every_layer_count

    model = make_every_layer_count(edge_model("ModernBertModel", global_attn_every_n_layers=1), 0)  # all global
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(1, 64, (1, n), generator=g) for n in (40, 40, 25))
    with torch.no_grad():
        model.config.attn_implementation = "eager"
        truth = model(a).last_hidden_state[0]
        model.config.attn_implementation = "flash_attention_2"
        try:
            uniform = model(torch.cat((a, b))).last_hidden_state[0]
            ragged_mask = torch.tensor([[1] * 40, [1] * 25 + [0] * 15])
            ragged = model(torch.cat((a, F.pad(c, (0, 15)))), attention_mask=ragged_mask).last_hidden_state[0]
        finally:
            model.config.attn_implementation = None
    e_uniform, e_ragged = ((x - truth).abs().max().item() for x in (uniform, ragged))
    assert max(e_uniform, e_ragged) <= 10 * min(e_uniform, e_ragged) + 1e-5, (e_uniform, e_ragged)


def test_attention_kernels_chosen_by_name_device_dtype_and_packing_and_their_errors(small, monkeypatch):
    with pytest.raises(ValueError, match="attn_implementation 'flash' is unknown: use one of"):
        mb.ModernBertConfig(attn_implementation="flash")
    model = small["ModernBertModel"]
    ids = torch.ones(1, 4, dtype=torch.long)
    model.config.attn_implementation = "xformers"  # set after construction: checked at the next forward
    with pytest.raises(ValueError, match="'xformers' is unknown"):
        model(ids)
    model.config.attn_implementation = "flash_attention_2"
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*cpu"):  # on CPU, whatever is installed
        model(ids)
    model.config.attn_implementation = None
    ragged, uniform = mb.Packing.from_mask(torch.tensor([[1, 1], [1, 0]])), mb.Packing.from_mask(torch.ones(2, 2))
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # a device object only: nothing runs on the GPU here

    def kernels(name, device, dtype, packing=ragged):
        return set(mb.attention_kernels(name, device, dtype, packing, 4).values())

    for dtype in (torch.float32, torch.bfloat16):  # a CPU: sdpa, global layers one call per sequence
        chosen = mb.attention_kernels(None, cpu, dtype, ragged, 4)
        assert chosen == {"full_attention": mb.sdpa_per_sequence, "sliding_attention": mb.sdpa_attention}
    assert mb.attention_kernels(None, cpu, torch.float32, uniform, 4)["full_attention"] is mb.sdpa_per_sequence
    assert kernels("eager", cpu, torch.float32) == {mb.eager_attention}
    (flex,) = kernels("flex_attention", cpu, torch.float32)  # one block mask per layer type, shared by its layers
    assert flex.func is mb.flex_attention and set(flex.keywords["block_masks"]) == {None, 4}
    traced = mb.pack_for_tracing(torch.tensor([[1, 1, 0], [0, 1, 1]]))  # varlen flash cannot serve it
    for name in (None, "flash_attention_2"):
        assert set(mb.attention_kernels(name, gpu, torch.bfloat16, traced, 4).values()) == {mb.sdpa_attention}
    with pytest.raises(RuntimeError, match="no attention dropout"):
        mb.flex_attention(*random_packed([5])[:3], ragged, None, dropout_p=0.1)
    q, k, v, packing = random_packed([5])  # flex has no backward pass on a CPU: sdpa, the same rule, serves autograd
    out = mb.flex_attention(q.requires_grad_(), k, v, packing, None)
    assert out.grad_fn is not None and torch.equal(out, mb.sdpa_attention(q, k, v, packing, None))
    try:
        import flash_attn  # noqa: F401

        has_kernel = True
    except ImportError:
        import inspect

        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:  # torch's varlen_attn came in 2.10
            varlen_attn = None
        has_kernel = varlen_attn is not None and "window_size" in inspect.signature(varlen_attn).parameters
    if has_kernel:  # torch 2.13 (CI's) has varlen_attn with the window: a bf16 model on a GPU picks flash
        chosen = mb.attention_kernels(None, gpu, torch.bfloat16, ragged, 4)
        assert chosen["full_attention"].func is chosen["sliding_attention"].func is mb.flash_attention
        chosen = mb.attention_kernels(None, gpu, torch.bfloat16, uniform, 4)  # equal lengths: one dense SDPA call
        assert (
            chosen["full_attention"] is mb.sdpa_equal_lengths
            and chosen["sliding_attention"].func is mb.flash_attention
        )
        chosen = mb.attention_kernels(
            "flash_attention_2", gpu, torch.float32, uniform, 4
        )  # fp32: flash's bf16 all through
        assert chosen["full_attention"].func is chosen["sliding_attention"].func is mb.flash_attention
    # On a GPU without flash-attn and with a torch whose varlen_attn lacks window_size: a clear error
    # (asked for) or sdpa (chosen), never "the import worked".
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(
        builtins,
        "__import__",
        lambda name, *a, **k: (
            (_ for _ in ()).throw(ImportError(name)) if name == "flash_attn" else real_import(name, *a, **k)
        ),
    )
    monkeypatch.setattr(mb, "varlen_attn", lambda q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None: None)
    with pytest.raises(RuntimeError, match="pip install flash-attn"):
        mb.attention_kernels("flash_attention_2", gpu, torch.bfloat16, ragged, 4)
    assert kernels(None, gpu, torch.bfloat16) == {mb.sdpa_attention}
    assert kernels(None, gpu, torch.float32) == {mb.sdpa_attention}  # flash is never picked for fp32
    monkeypatch.setattr(mb, "varlen_attn", None)  # a torch without varlen_attn at all
    assert kernels(None, gpu, torch.bfloat16) == {mb.sdpa_attention}


def test_kernels_are_chosen_by_autocasts_dtype(small, monkeypatch):
    """Under autocast the layers compute in its dtype while the hidden states stay fp32: the kernel choice (varlen
    flash takes half precision only) must see autocast's dtype, not the states'."""
    seen, choose = [], mb.attention_kernels
    monkeypatch.setattr(
        mb,
        "attention_kernels",
        lambda name, device, dtype, *rest: seen.append(dtype) or choose(name, device, dtype, *rest),
    )
    ids = torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            small["ModernBertModel"](ids)
        small["ModernBertModel"](ids)
    assert seen == [torch.bfloat16, torch.float32]


def test_the_flash_kernel_is_looked_up_once_a_forward(monkeypatch):
    """attention_kernels asks for the flash kernel once, whether it was named or None may pick it, and binds it to
    every layer's kernel; it is not asked for again while the layers run."""
    looked_up = []
    kernel = object()
    monkeypatch.setattr(mb, "find_flash_kernel", lambda device: looked_up.append(device) or kernel)
    ragged = mb.Packing.from_mask(torch.tensor([[1, 1, 1], [1, 1, 0]]))
    gpu = torch.device("cuda")  # a device object only: nothing runs on a GPU here
    for name in (None, "flash_attention_2"):
        looked_up.clear()
        chosen = mb.attention_kernels(name, gpu, torch.bfloat16, ragged, 4)
        assert len(looked_up) == 1, name
        assert all(k.func is mb.flash_attention and k.keywords["varlen"] is kernel for k in chosen.values()), name
    looked_up.clear()  # None never picks flash for fp32: no lookup at all
    assert set(mb.attention_kernels(None, gpu, torch.float32, ragged, 4).values()) == {mb.sdpa_attention}
    assert looked_up == []


def test_no_name_falls_through_to_a_kernel_it_did_not_ask_for():
    """Each name maps to its own kernel, stated in attention_kernels: an unknown name is an error, not flex."""
    packing = mb.Packing.from_mask(torch.ones(2, 5, dtype=torch.long))
    cpu = torch.device("cpu")
    assert set(mb.attention_kernels("eager", cpu, torch.float32, packing, 2).values()) == {mb.eager_attention}
    assert mb.attention_kernels("sdpa", cpu, torch.float32, packing, 2)["sliding_attention"] is mb.sdpa_attention
    with pytest.raises(ValueError, match="'xformers' is unknown"):
        mb.attention_kernels("xformers", cpu, torch.float32, packing, 2)


# ----------------------------------------------------------------------------------------------------
# Weight initialisation: trunc_normal_, init_role, init_weights


def test_truncated_normal_has_torchs_distribution():
    """trunc_normal_ (normals, only those beyond the cutoff redrawn) against torch's nn.init.trunc_normal_ on a
    million draws each: inside the bounds, the same mean and spread (a normal cut at +-2 sigma keeps 0.8796 of its
    std), the same shape (the largest gap between the two CDFs). Clamping instead of redrawing must fail it."""

    def cdf(x, at):
        return torch.searchsorted(x.sort().values, at, right=True) / x.numel()

    std, cutoff, n, at = 0.02, 0.04, 1_000_000, torch.linspace(-0.04, 0.04, 401)
    torch.manual_seed(0)
    torchs = torch.nn.init.trunc_normal_(torch.empty(n), 0.0, std, -cutoff, cutoff)
    clamped = torch.empty(n).normal_(0.0, std).clamp_(-cutoff, cutoff)
    for name, x in {"ours": mb.trunc_normal_(torch.empty(n), std, cutoff), "clamped": clamped}.items():
        same = (
            x.abs().max() <= cutoff
            and abs(x.mean()) < 5 * std / n**0.5
            and abs(x.std() / (0.87962566 * std) - 1) < 0.01
            and (cdf(x, at) - cdf(torchs, at)).abs().max() < 0.004
        )
        assert same == (name == "ours"), f"{name}: mean {x.mean():.3g}, std {x.std():.4g}"


@needs_transformers
@pytest.mark.parametrize("cls_name", ["ModernBertForMaskedLM", "ModernBertForSequenceClassification"])
def test_weights_start_at_the_official_scale_of_their_role(cls_name):
    """init_weights scales each weight by the role its module declares in `init_roles`; every weight matrix
    starts with the spread of the official model's (transformers' own init), within sampling noise. A module
    with a weight and no role is an error naming it, not a silent guess."""
    config = dict(vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4)
    config.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    torch.manual_seed(0)
    ours = getattr(mb, cls_name)(mb.ModernBertConfig(**config))
    official = getattr(transformers, cls_name)(transformers.ModernBertConfig(**config))
    theirs = dict(official.named_parameters())
    for name, p in ours.named_parameters():
        if p.dim() == 2:
            ratio = p.std().item() / theirs[name].std().item()
            assert 0.9 < ratio < 1.1, f"{name}: std {p.std().item():.4g}, official {theirs[name].std().item():.4g}"

    class WithExtra(mb.ModernBertForSequenceClassification):
        def __init__(self, config):
            super().__init__(config)
            self.extra = torch.nn.Linear(4, 4)
            self.init_weights()

    with pytest.raises(TypeError, match="WithExtra.extra has no init role"):
        WithExtra(mb.ModernBertConfig(**config))


def test_each_weight_is_initialised_once_by_the_class_built(monkeypatch):
    """A head class builds its backbone with init=False and initialises every weight itself, once: no matrix is
    drawn twice (every head class used to initialise its backbone twice)."""
    drawn = []
    draw = mb.trunc_normal_
    monkeypatch.setattr(mb, "trunc_normal_", lambda w, std, cutoff: drawn.append(w) or draw(w, std, cutoff))
    config = mb.ModernBertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4
    )
    for cls in (mb.ModernBertModel, mb.ModernBertForMaskedLM, mb.ModernBertForSequenceClassification):
        drawn.clear()
        model = cls(config)
        matrices = {id(p) for p in model.parameters() if p.dim() == 2}
        assert len(drawn) == len({id(w) for w in drawn}) == len(matrices), cls.__name__


# ----------------------------------------------------------------------------------------------------
# ModernBertPreTrainedModel: a transformers config in, transformers' conveniences out


@needs_transformers
def test_a_transformers_config_builds_a_model_with_transformers_conveniences(tmp_path):
    official = transformers.ModernBertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        local_attention=8,
        global_rope_theta=1000.0,
        pad_token_id=0,
        num_labels=3,
    )
    ours = mb.ModernBertForSequenceClassification(official)  # a transformers config, read through its dict
    assert (
        ours.config.global_rope_theta == 1000.0
        and ours.config.num_labels == 3
        and ours.config.layer_types[3] == "full_attention"
    )
    theirs = transformers.ModernBertForSequenceClassification(official)
    assert ours.num_parameters() == theirs.num_parameters()
    for kwargs in (dict(only_trainable=True), dict(exclude_embeddings=True)):
        assert ours.num_parameters(**kwargs) == theirs.num_parameters(**kwargs), kwargs
    assert ours.get_input_embeddings() is ours.model.embeddings.tok_embeddings
    ours.save_pretrained(tmp_path)
    assert mb.ModernBertConfig.from_pretrained(tmp_path) == ours.config


# ----------------------------------------------------------------------------------------------------
# Task heads: every head's loss and gradients; masked LM's sparse prediction; sequence classification's
# problem types and its cls pooling under left padding


def head_inputs(config, cls_name, padded=True):
    """A batch with labels for each head; QA is unpadded (the official loss scores padded positions)."""
    g = torch.Generator().manual_seed(7)
    if cls_name == "ModernBertForMultipleChoice":
        ids, mask = ragged_batch(config, [140, 100, 61, 140, 33, 90], left=(1, 4))
        return dict(input_ids=ids.view(2, 3, -1), attention_mask=mask.view(2, 3, -1), labels=torch.tensor([1, 2]))
    lengths = [140, 100, 61] if padded and cls_name != "ModernBertForQuestionAnswering" else [140, 140, 140]
    ids, mask = ragged_batch(config, lengths, left=(2,))
    if cls_name == "ModernBertForQuestionAnswering":
        return dict(
            input_ids=ids,
            attention_mask=mask,
            start_positions=torch.tensor([3, 50, 200]),
            end_positions=torch.tensor([9, 60, 139]),
        )
    if cls_name == "ModernBertForSequenceClassification":
        return dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    labels = torch.randint(
        0,
        config.num_labels if cls_name == "ModernBertForTokenClassification" else config.vocab_size,
        ids.shape,
        generator=g,
    )
    return dict(input_ids=ids, attention_mask=mask, labels=labels.masked_fill(mask == 0, -100))


@needs_transformers
@pytest.mark.parametrize("cls_name", sorted(HEAD_CASES))
def test_every_head_loss_and_gradients_match_official(cls_name):
    official, ours = official_and_ours(cls_name, seed=11, local_attention=16, **HEAD_CASES[cls_name])
    official.train(), ours.train()  # dropout is 0: train mode only checks nothing depends on eval()
    inputs = head_inputs(official.config, cls_name)
    ref, out = official(**inputs), ours(**inputs)
    assert_close(out.loss, ref.loss, FP32_TOL, f"{cls_name} loss")
    ref.loss.backward()
    out.loss.backward()
    theirs = dict(official.named_parameters())
    for name, p in ours.named_parameters():
        scale = max(theirs[name].grad.abs().max().item(), 1e-3)
        assert_close(
            p.grad / scale, theirs[name].grad / scale, 1e-4, f"{cls_name} grad of {name} (relative to its max)"
        )


@needs_transformers
@pytest.mark.parametrize("sparse", [False, True])
def test_masked_lm_sparse_prediction_matches_official(sparse):
    official, ours = official_and_ours("ModernBertForMaskedLM", sparse_prediction=sparse, local_attention=16)
    inputs = head_inputs(official.config, "ModernBertForMaskedLM")
    inputs["labels"] = inputs["labels"].masked_fill(
        torch.rand(inputs["labels"].shape, generator=torch.Generator().manual_seed(1)) < 0.8, -100
    )
    with torch.no_grad():
        ref, out = official(**inputs), ours(**inputs)
    assert_close(out.loss, ref.loss, FP32_TOL, "loss")
    if sparse:  # only the labelled positions are decoded, in the official order
        assert (
            out.logits.shape
            == ref.logits.shape
            == ((inputs["labels"] != -100).sum().item(), official.config.vocab_size)
        )
        assert_close(out.logits, ref.logits, FP32_TOL, "sparse logits")


@needs_transformers
@pytest.mark.parametrize("labels", ["regression_1", "regression_3", "multi_label", "single_label"])
def test_sequence_classification_problem_types_match_official(labels):
    n = {"regression_1": 1, "regression_3": 3, "multi_label": 3, "single_label": 3}[labels]
    problem = {"regression_3": "regression"}.get(labels)
    official, ours = official_and_ours(
        "ModernBertForSequenceClassification", num_labels=n, problem_type=problem, classifier_pooling="mean"
    )
    ids, mask = ragged_batch(official.config, [90, 50, 20], left=(1,))
    g = torch.Generator().manual_seed(0)
    y = {"single_label": torch.tensor([0, 2, 1]), "multi_label": (torch.rand(3, 3, generator=g) > 0.5).float()}.get(
        labels, torch.randn(3, n, generator=g).squeeze(-1)
    )
    with torch.no_grad():
        ref, out = official(ids, attention_mask=mask, labels=y), ours(ids, attention_mask=mask, labels=y)
    assert_close(out.logits, ref.logits, FP32_TOL, "logits")
    assert_close(out.loss, ref.loss, FP32_TOL, f"{labels} loss")


@needs_transformers
def test_cls_pooling_takes_the_first_real_token_under_left_padding():
    """The official sequence classifier pools position 0 even when it is padding; ours pools the first
    real token (as the official multiple-choice head does), so a left-padded batch gives what the
    official model gives on the same texts right-padded."""
    official, ours = official_and_ours("ModernBertForSequenceClassification", num_labels=3, classifier_pooling="cls")
    ids, mask = ragged_batch(official.config, [120, 80, 33], seed=5)
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for i, n in enumerate(mask.sum(1).tolist()):
        left_ids[i, -n:], left_mask[i, -n:] = ids[i, :n], 1
        left_ids[i, :-n] = official.config.pad_token_id
    with torch.no_grad():
        assert_close(
            ours(left_ids, attention_mask=left_mask).logits,
            official(ids, attention_mask=mask).logits,
            FP32_TOL,
            "cls pooling, left padded",
        )


# ----------------------------------------------------------------------------------------------------
# The whole model against the official one: the golden files on every kernel and the wrong variants they
# catch, live random configs on every layer, a seeded sweep, state-dict exchange, bf16, the GPU, the real
# checkpoint


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_golden_files_match_on_every_kernel(case, impl, flash_standin):
    model, inputs, expected = load_case(case, impl)
    if impl == "flash_attention_2":  # attention runs in bf16 (8 bits of mantissa) through 4 layers
        compare_case(model, inputs, expected, 0.03, f"{case}/{impl}", relative=True)
    else:
        compare_case(model, inputs, expected, FP32_TOL, f"{case}/{impl}")
    if impl == "flash_attention_2":  # local layers get the window, global ones none (fp32: flash on all layers)
        window = model.config.local_attention // 2
        assert set(flash_standin) == {(window, window), (-1, -1)}, "flash must get the window on local layers only"


def test_golden_files_cover_both_config_formats_and_poolings():
    configs = [json.load(open(os.path.join(FIXTURES, c, "config.json"))) for c in CASES]
    assert any("layer_types" in c for c in configs) and any(
        "global_attn_every_n_layers" in c and "layer_types" not in c for c in configs
    )
    assert {c["classifier_pooling"] for c in configs} == {"cls", "mean"}
    assert {c["architectures"][0] for c in configs} == {
        "ModernBertModel",
        "ModernBertForMaskedLM",
        "ModernBertForSequenceClassification",
        "ModernBertForTokenClassification",
        "ModernBertForQuestionAnswering",
        "ModernBertForMultipleChoice",
    }
    versions = json.load(open(os.path.join(FIXTURES, "VERSIONS.json")))
    assert versions["transformers"]  # written by make_fixtures.py from the official implementation


# Each wrong variant breaks one detail that some port got wrong; the golden comparison must catch it.
def _tanh_gelu(model):
    for m in model.modules():
        if isinstance(m, mb.ModernBertMLP):
            m.act = torch.nn.GELU(approximate="tanh")


def _swap_theta(model):
    c = model.config
    c.global_rope_theta, c.local_rope_theta = c.local_rope_theta, c.global_rope_theta


def _window_off_by_one(model):
    for m in model.modules():
        if isinstance(m, mb.ModernBertAttention) and m.half_window is not None:
            m.half_window += 1


def _norm_on_layer_0(model):
    layer0 = model.layers[0] if isinstance(model, mb.ModernBertModel) else model.model.layers[0]
    layer0.attn_norm = torch.nn.LayerNorm(model.config.hidden_size, bias=False)


def _rms_norm(model):
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.LayerNorm):
            m.forward = lambda x, m=m: F.rms_norm(x, m.normalized_shape, m.weight, m.eps)


def _one_theta(model):
    model.config.local_rope_theta = model.config.global_rope_theta


def _wrong_global_layers(model):  # (i + 1) % 3 == 0 instead of i % 3 == 0
    for i, m in enumerate(m for m in model.modules() if isinstance(m, mb.ModernBertAttention)):
        m.half_window = None if (i + 1) % 3 == 0 else model.config.half_window


def _interleaved_rope(monkeypatch):
    def rotate_pairs(x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)

    monkeypatch.setattr(mb, "rotate_half", rotate_pairs)


WRONG = {
    "tanh_gelu": _tanh_gelu,
    "swapped_theta": _swap_theta,
    "one_theta": _one_theta,
    "window_off_by_one": _window_off_by_one,
    "norm_on_layer_0": _norm_on_layer_0,
    "rms_norm": _rms_norm,
    "global_layers_shifted": _wrong_global_layers,
}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", sorted(WRONG) + ["interleaved_rope"])
def test_wrong_variants_fail_the_golden_comparison(variant, impl, monkeypatch):
    model, inputs, expected = load_case("model", impl)
    if variant == "interleaved_rope":
        _interleaved_rope(monkeypatch)
    else:
        WRONG[variant](model)
    with pytest.raises(AssertionError, match="max diff"):
        compare_case(model, inputs, expected, FP32_TOL, variant)


RANDOM_CONFIGS = {
    "small_window": dict(
        hidden_size=48,
        num_attention_heads=3,
        intermediate_size=40,
        num_hidden_layers=5,
        local_attention=8,
        global_attn_every_n_layers=2,
    ),
    "odd_sizes": dict(
        hidden_size=40,
        num_attention_heads=5,
        intermediate_size=72,
        num_hidden_layers=4,
        local_attention=20,
        global_rope_theta=50000.0,
        local_rope_theta=500.0,
    ),
    "all_global": dict(num_hidden_layers=3, global_attn_every_n_layers=1),
    "base_dims": dict(  # base's widths; a small vocabulary, as the official init of 50,368 rows takes seconds
        vocab_size=1024,
        hidden_size=768,
        intermediate_size=1152,
        num_attention_heads=12,
        num_hidden_layers=4,
        local_attention=128,
    ),
}


@needs_transformers
@pytest.mark.parametrize(  # base_dims (768 wide) adds width, not a new path: slow
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "base_dims" else n for n in sorted(RANDOM_CONFIGS)]
)
def test_random_configs_match_official_on_every_layer_and_kernel(name, flash_standin):
    official, ours = official_and_ours("ModernBertForMaskedLM", **RANDOM_CONFIGS[name])
    ids, mask = ragged_batch(official.config, [300, 171, 64, 9], left=(1,), seed=3)
    with torch.no_grad():
        ref = official(ids, attention_mask=mask, output_hidden_states=True)
        for impl in LOOPED_IMPLS:
            ours.config.attn_implementation = impl
            out = ours(ids, attention_mask=mask, output_hidden_states=True)
            m = mask.bool()
            for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
                scale = b[m].abs().max().item() if impl == "flash_attention_2" else 1.0
                assert_close(
                    a[m],
                    b[m],
                    (0.03 if impl == "flash_attention_2" else FP32_TOL) * scale,
                    f"{name}/{impl} hidden_states[{i}]",
                )
            if impl != "flash_attention_2":
                assert_close(
                    out.logits[m],
                    ref.logits[m],
                    FP32_TOL * 10 if name == "base_dims" else FP32_TOL,
                    f"{name}/{impl} logits",
                )


@needs_transformers
@pytest.mark.parametrize("seed", [0] + [pytest.param(seed, marks=pytest.mark.slow) for seed in range(1, 8)])
def test_seeded_random_configs_match_official_and_pad_inverts_unpad(seed, flash_standin):
    g = torch.Generator().manual_seed(seed)
    pick = lambda options: options[torch.randint(len(options), (1,), generator=g).item()]  # noqa: E731
    heads, head_dim = pick([1, 2, 4]), pick([4, 8, 16])
    cfg = dict(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        intermediate_size=pick([8, 24, 50]),
        num_hidden_layers=pick([1, 2, 4]),
        local_attention=pick([2, 6, 16, 64]),
        global_attn_every_n_layers=pick([1, 2, 3]),
        classifier_pooling=pick(["cls", "mean"]),
    )
    official, ours = official_and_ours("ModernBertForTokenClassification", seed=seed, num_labels=3, **cfg)
    B, S = pick([1, 2, 5]), pick([1, 7, 40, 150])
    lengths = torch.randint(1, S + 1, (B,), generator=g).tolist()
    ids, mask = ragged_batch(
        official.config, lengths, left=[i for i in range(B) if torch.rand(1, generator=g) < 0.5], seq=S, seed=seed
    )
    m = mask.bool()
    packing = mb.Packing.from_mask(mask)
    assert torch.equal(
        packing.to_input_shape(mb.unpad(ids, packing.indices)).masked_fill(~m, 0), ids.masked_fill(~m, 0)
    )  # pad(unpad(x)) == x on real tokens
    assert packing.cu_seqlens.tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist() and packing.max_seqlen == max(
        lengths
    )
    with torch.no_grad():
        ref = official(ids, attention_mask=mask).logits[m]
        for impl in LOOPED_IMPLS:
            ours.config.attn_implementation = impl
            out = ours(ids, attention_mask=mask).logits[m]
            assert_close(
                out,
                ref,
                0.03 * ref.abs().max().item() if impl == "flash_attention_2" else FP32_TOL,
                f"seed {seed} {cfg} lengths {lengths} {impl}",
            )


@needs_transformers
def test_no_pad_token_id_builds_and_matches_official(tmp_path):
    """transformers takes pad_token_id=None (no padding row in the embeddings); so must we, with its numbers."""
    official, ours = official_and_ours("ModernBertForMaskedLM", pad_token_id=None)
    mask = torch.tensor([[1] * 40, [1] * 25 + [0] * 15])
    ids = torch.randint(4, official.config.vocab_size, mask.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = official(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    assert_close(out[mask.bool()], ref[mask.bool()], FP32_TOL, "pad_token_id=None logits")
    ours.save_pretrained(tmp_path / "nopad")
    assert mb.ModernBertForMaskedLM.from_pretrained(tmp_path / "nopad").config.pad_token_id is None


@needs_transformers
@pytest.mark.parametrize("cls_name", ["ModernBertModel"] + sorted(HEAD_CASES))
def test_state_dict_exchange_is_strict_both_ways(cls_name):
    official, ours = official_and_ours(cls_name, **HEAD_CASES.get(cls_name, {}))
    assert list(ours.state_dict()) == list(official.state_dict())
    for k, v in official.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k
    fresh_official = getattr(transformers, cls_name)(official.config)
    fresh_official.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(fresh_official.state_dict()[k], v), k


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_model_stays_close_to_fp32_official(impl, flash_standin):
    """A whole bf16 model against the official fp32 outputs, at positions up to 320: the documented
    bf16 tolerance (4% of the output scale, with 4 layers made to count)."""
    model, inputs, expected = load_case("model", impl)
    model_bf16, _, _ = load_case("model", impl, dtype=torch.bfloat16)
    with torch.no_grad():
        half = model_bf16(**inputs).last_hidden_state.float()
    m = inputs["attention_mask"].bool()
    ref = expected["last_hidden_state"][m]
    assert_close(half[m], ref, 0.04 * ref.abs().max().item(), f"bf16 {impl} vs fp32 official")
    assert torch.isfinite(half).all()


@pytest.mark.gpu
@needs_gpu
@needs_transformers
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_gpu_is_as_exact_as_the_official(dtype):
    import copy

    official, ours = official_and_ours("ModernBertForMaskedLM", local_attention=64, num_hidden_layers=6)
    official, ours = official.cuda(), ours.cuda()
    ids, mask = ragged_batch(official.config, [400, 301, 77, 5], left=(1,))
    ids, mask = ids.cuda(), mask.cuda()
    m = mask.bool()
    rows = [ids[i][m[i]] for i in range(len(ids))]
    packed = dict(
        input_ids=torch.cat(rows)[None], cu_seqlens=torch.tensor([0] + [len(r) for r in rows], device="cuda").cumsum(0)
    )
    with torch.no_grad():
        truth = official(ids, attention_mask=mask).logits[m]
        official_half = official.to(dtype)(ids, attention_mask=mask).logits[m]
        ours = ours.to(dtype)
        compiled = copy.deepcopy(ours).compile()
        assert (
            mb.attention_kernels(None, ids.device, dtype, mb.Packing.from_mask(mask), 64)["full_attention"].func
            is mb.flash_attention
        )
        for impl in (None, "flash_attention_2", "flex_attention", "sdpa", "eager"):
            for model, name in ((ours, "eager mode"), (compiled, "compiled")):
                model.config.attn_implementation = impl
                within_official_error(
                    model(ids, attention_mask=mask).logits[m], official_half, truth, f"{impl} {dtype} {name}, padded"
                )
                within_official_error(
                    model(**packed).logits[0], official_half, truth, f"{impl} {dtype} {name}, packed"
                )
        ours.config.attn_implementation = None
        # Wrong variants the same check must catch. (A tanh GELU hides in half precision's own noise here: its
        # error stayed within 1.25x of the official bf16 error on an H100, so it is caught in fp32 only.)
        for wrong in (_swap_theta, _norm_on_layer_0):
            broken = copy.deepcopy(ours)
            wrong(broken)
            broken.to("cuda", dtype)  # a replaced norm is born on the CPU in fp32
            with pytest.raises(AssertionError, match="allowed"):
                within_official_error(broken(ids, attention_mask=mask).logits[m], official_half, truth, wrong.__name__)


@pytest.mark.hub
def test_official_golden_values_on_the_real_checkpoint(hub):
    """REFERENCE.md's values from the released answerdotai/ModernBERT-base (fp32, CPU)."""
    folder = hub
    tokenizer = load_tokenizer(folder)
    mlm = mb.ModernBertForMaskedLM.from_pretrained(folder)
    hello = tokenize(tokenizer, ["Hello World!"])
    with torch.no_grad():
        out = mlm(**hello, output_hidden_states=True)
    expected_hidden = torch.tensor(
        [[0.3151, -0.6417, -0.7027], [-0.7834, -1.5810, 0.4576], [1.0614, -0.7268, -0.0871]]
    )
    expected_logits = torch.tensor(
        [[3.8387, -0.2017, 12.2839], [3.6300, 0.6869, 14.7123], [-5.1137, -3.8122, 11.9874]]
    )
    assert_close(out.hidden_states[-1][0, :3, :3], expected_hidden, 1e-4, "ModernBertModel 'Hello World!'")
    assert_close(out.logits[0, :3, :3], expected_logits, 1e-4, "ModernBertForMaskedLM 'Hello World!'")
    batch = tokenize(tokenizer, ["the man worked as a [MASK]."])
    n = batch["input_ids"].shape[1]  # padded to 512: exercises padding and the window
    ids = F.pad(batch["input_ids"], (0, 512 - n), value=mlm.config.pad_token_id)
    mask = F.pad(batch["attention_mask"], (0, 512 - n))
    with torch.no_grad():
        logits = mlm(ids, attention_mask=mask).logits[0, (ids[0] == 50284).nonzero()[0, 0]]
    assert [tokenizer.decode([t]).strip() for t in logits.topk(5).indices.tolist()] == [
        "lawyer",
        "mechanic",
        "teacher",
        "doctor",
        "waiter",
    ]
    assert fill_mask(mlm, tokenizer, "The capital of France is [MASK].")[0][0][0]["token_str"] == " Paris"


# ----------------------------------------------------------------------------------------------------
# Outputs: ModernBertOutput reads as transformers' ModelOutput


def test_outputs_read_by_attribute_key_and_index(small):
    ids, labels = torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)
    out = small["ModernBertForMaskedLM"](ids, labels=labels, output_hidden_states=True)
    assert list(out.keys()) == ["loss", "logits", "hidden_states"] and isinstance(out, dict)
    assert out["loss"] is out.loss is out[0] and out[1] is out.logits and out[1:] == out.to_tuple()[1:]
    plain = small["ModernBertForMaskedLM"](ids)
    assert plain[0] is plain.logits and plain.loss is None and plain.hidden_states is None and "loss" not in plain
    as_tuple = small["ModernBertForMaskedLM"](ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2 and torch.equal(as_tuple[1], plain.logits)
    qa = small["ModernBertForQuestionAnswering"](
        ids, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4])
    )
    assert list(qa) == ["loss", "start_logits", "end_logits"]
    assert list(small["ModernBertModel"](ids, output_hidden_states=True)) == ["last_hidden_state", "hidden_states"]
    with pytest.raises(AttributeError, match="no field 'attentions'"):
        out.attentions


# ----------------------------------------------------------------------------------------------------
# Losses: as transformers computes them, but in fp32 in every head, never counting padding, labels on any device


LOSS_CASES = {  # name -> (class, config, inputs (B=2, S=12) -> labels, as the head takes them)
    "masked_lm": ("ModernBertForMaskedLM", {}, lambda g: dict(labels=torch.randint(0, 64, (2, 12), generator=g))),
    "token_classification": (
        "ModernBertForTokenClassification",
        {},
        lambda g: dict(labels=torch.randint(0, 2, (2, 12), generator=g)),
    ),
    "question_answering": (
        "ModernBertForQuestionAnswering",
        {},
        lambda g: dict(start_positions=torch.tensor([1, 3]), end_positions=torch.tensor([2, 5])),
    ),
    "single_label": ("ModernBertForSequenceClassification", {}, lambda g: dict(labels=torch.tensor([0, 1]))),
    "multi_label": ("ModernBertForSequenceClassification", {}, lambda g: dict(labels=torch.rand(2, 2, generator=g))),
    "regression": (
        "ModernBertForSequenceClassification",
        dict(num_labels=1),
        lambda g: dict(labels=torch.tensor([0.5, -1.5])),
    ),
    "multiple_choice": ("ModernBertForMultipleChoice", {}, lambda g: dict(labels=torch.tensor([2, 0]))),
}


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_every_head_loss_is_fp32_in_a_bf16_model(case):
    """One rule for every head: the loss is computed in fp32 from the logits, whatever the model's dtype."""
    cls_name, config, labels = LOSS_CASES[case]
    model = edge_model(cls_name, **config).bfloat16()
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 12) if case == "multiple_choice" else (2, 12)
    with torch.no_grad():
        out = model(torch.randint(1, 64, shape, generator=g), **labels(g))
    assert out.loss.dtype == torch.float32, f"{case}: loss in {out.loss.dtype}"


def test_question_answering_loss_never_counts_padding(small):
    """A padded batch gives the loss of the same texts unpadded; counting padded positions as candidate
    answers (the official loss) gives another number."""
    model = small["ModernBertForQuestionAnswering"]
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 64, (n,), generator=g) for n in (12, 7, 9)]
    starts, ends = torch.tensor([2, 0, 8]), torch.tensor([5, 6, 8])
    padded = dict(
        input_ids=torch.stack([F.pad(r, (0, 12 - len(r))) for r in rows]),
        attention_mask=torch.stack([F.pad(torch.ones_like(r), (0, 12 - len(r))) for r in rows]),
    )
    with torch.no_grad():
        out = model(**padded, start_positions=starts, end_positions=ends)
        alone = [
            model(r[None], start_positions=s[None], end_positions=e[None]).loss for r, s, e in zip(rows, starts, ends)
        ]
        # the same texts unpadded, one at a time: per-text CEs; the batch loss is their mean, start and end alike
        counting_padding = (F.cross_entropy(out.start_logits, starts) + F.cross_entropy(out.end_logits, ends)) / 2
    assert_close(out.loss, torch.stack(alone).mean(), 1e-6, "padded batch vs texts alone")
    assert (counting_padding - out.loss).abs() > 1e-3, "counting padded positions as answers must change the loss"


def test_problem_type_is_not_written_back_to_the_config(small):
    model = small["ModernBertForSequenceClassification"]
    model(torch.ones(2, 4, dtype=torch.long), labels=torch.tensor([0, 1]))
    assert model.config.problem_type is None


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_labels_on_the_cpu_for_a_model_on_the_gpu(case):
    """Labels may come on the CPU (a DataLoader's) for a model on the GPU: every head's loss is the one it gives
    with the labels on the GPU. (Token labels: the padding check moved the mask to the labels' device, and the
    labels were then indexed with the GPU's token indices.)"""
    cls_name, config, labels = LOSS_CASES[case]
    model = edge_model(cls_name, **config).cuda()
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 12) if case == "multiple_choice" else (2, 12)
    ids, on_cpu = torch.randint(1, 64, shape, generator=g).cuda(), labels(g)
    if cls_name in ("ModernBertForMaskedLM", "ModernBertForTokenClassification"):  # the second row right-padded
        mask = torch.ones(shape, dtype=torch.long)
        mask[1, 7:] = 0
        on_cpu["labels"] = on_cpu["labels"].masked_fill(mask == 0, -100)
        on_cpu["attention_mask"] = mask
    on_gpu = {k: v.cuda() for k, v in on_cpu.items()}
    with torch.no_grad():
        expected = model(ids, **on_gpu).loss
        loss = model(ids, **{**on_cpu, "attention_mask": on_gpu.get("attention_mask")}).loss
    assert loss.device == expected.device and torch.equal(loss, expected), case


# ----------------------------------------------------------------------------------------------------
# RoPE scaling (long context): normalize_rope, scaled_frequencies, yarn_frequencies


# RoPE scaling (rope_parameters with rope_type other than default), per layer type, against transformers on
# sequences past original_max_position_embeddings; each case also shows the comparison fails on a wrong variant
# of the official model itself (the frequencies of plain RoPE; YaRN without its attention scaling).
ROPE_CASES = {
    "yarn_global": {"full_attention": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 160}},
    "yarn_both": {
        t: {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 160, "beta_fast": 32.0}
        for t in ("full_attention", "sliding_attention")
    },
    "yarn_mscale": {
        "full_attention": {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 80,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
            "beta_fast": 16,
            "beta_slow": 2,
        }
    },
    "linear_global": {"full_attention": {"rope_type": "linear", "factor": 4.0}},
    "linear_local": {"sliding_attention": {"rope_type": "linear", "factor": 2.5}},
    "dynamic_both": {t: {"rope_type": "dynamic", "factor": 2.0} for t in ("full_attention", "sliding_attention")},
}


ROPE_MODEL = dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=4, local_attention=32)  # head_dim 64


def rope_hidden_states(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask, output_hidden_states=True).hidden_states


def rope_max_diff(states, ref, mask):
    return max((a[mask.bool()] - b[mask.bool()]).abs().max().item() for a, b in zip(states, ref))


ROPE_CASES_FAST = ("yarn_both", "linear_global")  # YaRN on both layer types, linear on one; the rest: --slow


@needs_transformers
@pytest.mark.parametrize(
    "case", [c if c in ROPE_CASES_FAST else pytest.param(c, marks=pytest.mark.slow) for c in sorted(ROPE_CASES)]
)
def test_rope_scaling_matches_official_past_the_original_length(case):
    import copy

    from fixtures.make_fixtures import build

    official = build(
        "ModernBertModel",
        0,
        **ROPE_MODEL,
        max_position_embeddings=640,
        rope_parameters=copy.deepcopy(ROPE_CASES[case]),
    )
    ids, mask = ragged_batch(official.config, [640, 450, 200], left=(2,), seed=1)
    ref = rope_hidden_states(official, ids, mask)
    rotary = official.rotary_emb
    for t, rope in official.config.rope_parameters.items():  # a wrong variant of the official model must fail
        if rope["rope_type"] in ("default", "dynamic"):
            continue  # (dynamic is plain RoPE up to max_position_embeddings)
        inv_freq, scaling = getattr(rotary, f"{t}_inv_freq").clone(), getattr(rotary, f"{t}_attention_scaling")
        if rope["rope_type"] == "yarn":  # YaRN without its attention scaling
            setattr(rotary, f"{t}_attention_scaling", 1.0)
        else:  # the frequencies of plain RoPE
            getattr(rotary, f"{t}_inv_freq").copy_(1.0 / rope["rope_theta"] ** (torch.arange(0, 64, 2) / 64))
        off = rope_max_diff(rope_hidden_states(official, ids, mask), ref, mask)
        assert off > 100 * FP32_TOL, f"{case}/{t}: a wrong variant is only {off:.2g} off: the test could not fail"
        getattr(rotary, f"{t}_inv_freq").copy_(inv_freq)
        setattr(rotary, f"{t}_attention_scaling", scaling)
    ours = mb.ModernBertModel(mb.ModernBertConfig.from_dict(official.config.to_dict())).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    for i, (a, b) in enumerate(zip(rope_hidden_states(ours, ids, mask), ref)):  # RoPE comes before any kernel
        assert_close(a[mask.bool()], b[mask.bool()], FP32_TOL, f"{case} hidden_states[{i}]")


ROPE_FREQUENCY_CASES = {  # name -> (rope_parameters, max_position_embeddings): the 32K config, YaRN's other fields
    "yarn_32k": (
        {"full_attention": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}},
        32768,
    ),
    "yarn_attention_factor": (
        {
            "full_attention": {
                "rope_type": "yarn",
                "factor": 3.0,
                "original_max_position_embeddings": 300,
                "attention_factor": 1.5,
            }
        },
        900,
    ),
    "yarn_no_original": ({"full_attention": {"rope_type": "yarn", "factor": 4.0}}, 1024),
    "yarn_factor_none": (
        {"sliding_attention": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 256}},
        1024,
    ),
    "dynamic_odd_factor": ({"full_attention": {"rope_type": "dynamic", "factor": 1.7}}, 1000),
}


@needs_transformers
@pytest.mark.parametrize("case", sorted(ROPE_CASES) + sorted(ROPE_FREQUENCY_CASES))
def test_rope_frequencies_are_the_official_bit_for_bit(case):
    """Each layer type's inv_freq and attention factor: exactly what transformers' rotary embedding keeps (the
    end-to-end test above cannot see every detail, e.g. YaRN's ramp rounded the other way at 32K)."""
    import copy

    from transformers.models.modernbert.modeling_modernbert import ModernBertRotaryEmbedding

    rope, max_positions = ROPE_FREQUENCY_CASES.get(case) or (ROPE_CASES[case], 640)
    official = transformers.ModernBertConfig(
        max_position_embeddings=max_positions, rope_parameters=copy.deepcopy(rope)
    )
    rotary = ModernBertRotaryEmbedding(official)
    config = mb.ModernBertConfig.from_dict(official.to_dict())
    for t in mb.LAYER_TYPES:
        inv_freq, factor = mb.rope_frequencies(config, t)
        expected = getattr(rotary, f"{t}_inv_freq"), getattr(rotary, f"{t}_attention_scaling")
        off = (inv_freq - expected[0]).abs().max().item()
        assert torch.equal(inv_freq, expected[0]) and factor == expected[1], f"{case} {t}: {off:.2g}, {factor}"


@needs_transformers
def test_rope_scaling_config_round_trips_in_both_formats(tmp_path):
    """A YaRN checkpoint saved here loads in transformers with the same rope_parameters and numbers; a v4 file's
    rope_scaling (the spelling the mmBERT-32K recipe saved with transformers 4.57) reads as transformers reads it:
    into both layer types."""
    import copy

    from fixtures.make_fixtures import build

    official = build(
        "ModernBertForMaskedLM",
        0,
        **ROPE_MODEL,
        max_position_embeddings=640,
        rope_parameters=copy.deepcopy(ROPE_CASES["yarn_global"]),
    )
    ours = mb.ModernBertForMaskedLM(mb.ModernBertConfig.from_dict(official.config.to_dict())).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    ours.save_pretrained(tmp_path / "yarn")
    written = json.loads((tmp_path / "yarn" / "config.json").read_text())
    assert written["rope_parameters"] == official.config.to_dict()["rope_parameters"]
    assert mb.ModernBertConfig.from_pretrained(tmp_path / "yarn") == ours.config
    theirs = transformers.ModernBertForMaskedLM.from_pretrained(tmp_path / "yarn").eval()
    ids, mask = ragged_batch(official.config, [640, 300], seed=1)
    with torch.no_grad():
        assert_close(
            theirs(ids, attention_mask=mask).logits[mask.bool()],
            official(ids, attention_mask=mask).logits[mask.bool()],
            FP32_TOL,
            "saved here, read there",
        )
    v4 = {
        **{k: v for k, v in official.config.to_dict().items() if k not in ("rope_parameters", "layer_types")},
        "global_rope_theta": 160000.0,
        "local_rope_theta": 10000.0,
        "global_attn_every_n_layers": 3,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 160},
    }
    expected = transformers.ModernBertConfig.from_dict(copy.deepcopy(v4)).to_dict()["rope_parameters"]
    assert mb.ModernBertConfig.from_dict(copy.deepcopy(v4)).to_dict()["rope_parameters"] == expected


@pytest.mark.parametrize(
    "rope, message",
    [
        (dict(rope_type="longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 4, factor=2.0), "'longrope'.*yarn"),
        (dict(rope_type="llama3", factor=8.0, low_freq_factor=1, high_freq_factor=4), "'llama3'.*yarn"),
        (dict(rope_type="yarn", factor=4.0, partial_rotary_factor=0.5), "partial_rotary_factor"),
        (dict(rope_type="yarn", factor=4.0, truncate=False), "truncate"),
        (dict(rope_type="linear"), "factor"),
    ],
    ids=["longrope", "llama3", "partial_rotary_factor", "truncate", "no-factor"],
)
def test_rope_parameters_not_computed_here_are_refused_naming_what_is(rope, message):
    """longrope and llama3: an error naming the type and what is supported; a partial rotary factor (the official
    model fails on it) and a per-layer-type truncate (the official model ignores it) likewise."""
    d = {**EDGE, "local_attention": 8, "pad_token_id": 0, "rope_parameters": {"full_attention": rope}}
    with pytest.raises(ValueError, match=message):
        mb.ModernBertConfig.from_dict(d)


def test_each_rope_base_has_one_place():
    """An entry's rope_theta sets its field; the two given differently are an error, not one silently dropped; and
    rope_parameters not keyed by layer type (the flat spelling of other models) is an error, not plain RoPE."""
    config = mb.ModernBertConfig(rope_parameters={"full_attention": {"rope_theta": 5.0}})
    assert config.global_rope_theta == 5.0 and config.to_dict()["rope_parameters"]["full_attention"]["rope_theta"] == 5
    with pytest.raises(ValueError, match="global_rope_theta and .* disagree"):
        mb.ModernBertConfig(global_rope_theta=7.0, rope_parameters={"full_attention": {"rope_theta": 5.0}})
    with pytest.raises(ValueError, match="layer types"):
        mb.ModernBertConfig(rope_parameters={"rope_type": "yarn", "factor": 4.0})


def test_dynamic_rope_stops_at_max_position_embeddings():
    """transformers rescales dynamic RoPE by the padded batch's width once it passes max_position_embeddings (and
    keeps the longest width seen for later batches); here a longer sequence is refused, as for every type."""
    d = {
        **EDGE,
        "local_attention": 8,
        "pad_token_id": 0,
        "max_position_embeddings": 64,
        "rope_parameters": {"full_attention": {"rope_type": "dynamic", "factor": 2.0}},
    }
    model = mb.ModernBertModel(mb.ModernBertConfig.from_dict(d)).eval()
    with torch.no_grad():
        model(torch.ones(1, 64, dtype=torch.long))
        with pytest.raises(ValueError, match="max_position_embeddings"):
            model(torch.ones(1, 65, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------
# Packed input: pack_inputs, packing_from_cu_seqlens, position_starts. As transformers' DataCollatorWithFlattening
# makes it, the same numbers as a padded batch on every kernel (the official model keeps the sequences apart only
# on its flash path), in every spelling of the boundaries.

PACKED_LENGTHS = [5, 30, 17, 1, 22]  # ragged, crossing the small model's +-4 window


def packed_and_padded(config, cls_name, flash_kwargs=True, seed=0):
    """The same texts twice: as the collator packs them (its labels: each sequence's first is -100) and as
    a right-padded batch with the same labels."""
    from transformers import DataCollatorWithFlattening

    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, config.vocab_size, (n,), generator=g) for n in PACKED_LENGTHS]
    n_labels = config.vocab_size if cls_name == "ModernBertForMaskedLM" else config.num_labels
    labels = [torch.randint(0, n_labels, (n,), generator=g) for n in PACKED_LENGTHS]
    with_labels = cls_name in ("ModernBertForMaskedLM", "ModernBertForTokenClassification")
    features = [
        {"input_ids": r.tolist(), **({"labels": y.tolist()} if with_labels else {})} for r, y in zip(rows, labels)
    ]
    packed = dict(DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(features))
    S = max(PACKED_LENGTHS)
    padded = dict(
        input_ids=torch.stack([F.pad(r, (0, S - len(r))) for r in rows]),
        attention_mask=torch.stack([F.pad(torch.ones_like(r), (0, S - len(r))) for r in rows]),
    )
    if with_labels:
        padded["labels"] = torch.stack(
            [F.pad(torch.cat([torch.tensor([-100]), y[1:]]), (0, S - len(y)), value=-100) for y in labels]
        )
    elif cls_name == "ModernBertForSequenceClassification":
        packed["labels"] = padded["labels"] = torch.tensor([0, 1, 1, 1, 0])
    else:
        packed.pop("labels", None)
    return packed, padded


@needs_transformers
@pytest.mark.parametrize("flash_kwargs", [True, False], ids=["flash_kwargs", "position_ids_only"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "cls_name",
    [
        "ModernBertModel",
        "ModernBertForMaskedLM",
        "ModernBertForTokenClassification",
        "ModernBertForQuestionAnswering",
        "ModernBertForSequenceClassification",
    ],
)
def test_collator_packed_input_equals_the_padded_batch(small, cls_name, impl, flash_kwargs, flash_standin):
    model = small[cls_name]
    model.config.attn_implementation = impl
    try:
        packed, padded = packed_and_padded(model.config, cls_name, flash_kwargs)
        with torch.no_grad():
            a, b = model(**packed), model(**padded)
    finally:
        model.config.attn_implementation = None
    real = padded["attention_mask"].bool()
    tol = 1e-5 if impl != "flash_attention_2" else 1e-2  # the flash stand-in computes in bf16, on both sides
    for key in a:
        if key == "loss" or cls_name == "ModernBertForSequenceClassification":  # one value per sequence
            assert_close(a[key], b[key], tol, f"{cls_name}/{impl} {key}")
        else:  # per token: the packed stream against the real tokens of the padded grid, in the same order
            assert_close(a[key][0], b[key][real], tol, f"{cls_name}/{impl} {key}")
    assert set(a) == set(b) and ("loss" in a) == ("labels" in packed)


@needs_transformers
def test_collator_packing_fails_when_the_sequences_are_not_kept_apart(small, monkeypatch):
    """The wrong variant for the test above: one sequence of the whole stream (what the official sdpa path
    computes from the collator's input) must not pass it."""
    packed, padded = packed_and_padded(small["ModernBertModel"].config, "ModernBertModel")
    one_stream = lambda cu, m, total: mb.Packing.from_mask(torch.ones(1, total, dtype=torch.long))  # noqa: E731
    monkeypatch.setattr(mb, "packing_from_cu_seqlens", one_stream)
    with torch.no_grad():
        a, b = small["ModernBertModel"](**packed), small["ModernBertModel"](**padded)
    with pytest.raises(AssertionError, match="max diff"):
        assert_close(a.last_hidden_state[0], b.last_hidden_state[padded["attention_mask"].bool()], 1e-5, "one stream")


def _packed(lengths, **extra):
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return dict(
        input_ids=torch.ones(1, sum(lengths), dtype=torch.long),
        position_ids=pos,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=max(lengths),
        max_length_k=max(lengths),
        **extra,
    )


def test_consistent_packing_in_every_spelling_gives_the_same_numbers(small):
    model = small["ModernBertModel"]
    full = _packed([3, 2, 4], seq_idx=torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]], dtype=torch.int32))
    with torch.no_grad():
        ref = model(**full).last_hidden_state
        for keys in (
            ["position_ids"],
            ["cu_seq_lens_q", "cu_seq_lens_k"],
            ["cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"],
        ):
            assert torch.equal(
                model(input_ids=full["input_ids"], **{k: full[k] for k in keys}).last_hidden_state, ref
            ), keys
        assert torch.equal(model(full["input_ids"], cu_seqlens=full["cu_seq_lens_q"]).last_hidden_state, ref)


# ----------------------------------------------------------------------------------------------------
# torch.compile: the whole forward traced (pack_for_tracing on padded batches) equals eager, with no graph break
# on packed input and no recompile across batch shapes; model.compile() (compile_layers) compiles each layer once


def three_batches(config, packed=False, seed=0):
    """Three ragged batches of different shapes, packed like the collator, or padded (ids, mask): on the right,
    on the left (cls pooling must skip it), and on the right with a hole in one row's mask (compacted: the
    tokens around it are neighbours), so compiled and exported forwards keep docs/differences.md's too."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths, left in (([5, 9, 17], False), ([30, 2, 11, 25], True), ([40, 41, 12, 7, 3], False)):
        rows = [torch.randint(1, config.vocab_size, (n,), generator=g) for n in lengths]
        if packed:
            out.append(_packed(lengths) | {"input_ids": torch.cat(rows)[None]})
        else:
            S = max(lengths)
            pads = [(S - len(r), 0) if left else (0, S - len(r)) for r in rows]
            out.append(
                dict(
                    input_ids=torch.stack([F.pad(r, p) for r, p in zip(rows, pads)]),
                    attention_mask=torch.stack([F.pad(torch.ones_like(r), p) for r, p in zip(rows, pads)]),
                )
            )
    if not packed:
        out[2]["attention_mask"][0, 10:16] = 0  # the hole
    return out


def fresh_dynamo():
    """Forget every compiled graph, and the counters that tell how many were compiled."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def graphs_compiled():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# The encoder, and each head with a path of its own: the masked LM's sparse decoder, sequence classification's
# pooling (padded or packed), multiple choice's reshape (it takes no packed input). Token classification and
# question answering are a linear layer on the encoder's output, and each compiles for seconds: not repeated here.
COMPILED_CASES = [("ModernBertModel", False), ("ModernBertModel", True), ("ModernBertForMaskedLM", False)]
COMPILED_CASES += [("ModernBertForMaskedLM", True), ("ModernBertForSequenceClassification", False)]
COMPILED_CASES += [("ModernBertForSequenceClassification", True), ("ModernBertForMultipleChoice", False)]


@pytest.mark.slow
@pytest.mark.parametrize("cls_name, packed", COMPILED_CASES)
def test_compiled_forward_equals_eager(small, cls_name, packed):
    """The whole forward traced by dynamo (aot_eager: the graph torch.compile hands to Inductor, run without
    Inductor's minutes of compiling): a padded batch takes the traced padded path, packed input the packed one."""
    model = small[cls_name]
    fresh_dynamo()
    compiled = torch.compile(model.forward, dynamic=True, fullgraph=packed, backend="aot_eager")
    for batch in three_batches(model.config, packed):
        if cls_name == "ModernBertForMultipleChoice":
            batch = {k: v[:2].unsqueeze(0) for k, v in batch.items()}  # (1, 2 choices, S)
        with torch.no_grad():
            a, b = compiled(**batch), model(**batch)
        for key in b:
            assert_close(a[key], b[key], 1e-5, f"{cls_name} {key}, compiled vs eager")
    assert graphs_compiled() <= 2, "a new batch shape compiled again"


@pytest.mark.slow
def test_layer_compile_with_inductor_equals_eager_and_never_recompiles(small):
    """model.compile(): each encoder layer through Inductor once, for every later shape, padded or packed."""
    import copy

    model = small["ModernBertForTokenClassification"]
    fresh_dynamo()
    compiled = copy.deepcopy(model).compile()
    batches = three_batches(model.config) + three_batches(model.config, packed=True)
    for i, batch in enumerate(batches):
        with torch.no_grad():
            assert_close(compiled(**batch).logits, model(**batch).logits, 1e-5, f"batch {i}")
        if i == 0:
            after_first = graphs_compiled()
    assert after_first == 2, "one graph for layer 0 (global, no attn_norm), one for the local layers"
    assert graphs_compiled() == after_first, "a new batch shape or packing compiled again"


COMPILED_PEAK = """
import sys, torch, modernbert as mb
S, impl = 4096, sys.argv[1] or None
config = mb.ModernBertConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
    num_attention_heads=4, local_attention=8, max_position_embeddings=S, attn_implementation=impl)
model = mb.ModernBertModel(config).eval()
ids, mask = torch.randint(1, 64, (1, S)), torch.ones(1, S, dtype=torch.long)
mask[0, S - 300 :] = 0  # padding: the traced path keeps it in the (1, S) grid
compiled = torch.compile(model) if impl != "eager" else model  # the control's S x S scores need no compiling
with torch.no_grad():
    compiled(ids, mask)  # compiles; the measured call below only runs
    rss = lambda field: int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from the current size
    before = rss("VmRSS:")
    out = compiled(ids, mask).last_hidden_state
    peak = rss("VmHWM:") - before
    assert (out - model(ids, mask).last_hidden_state).abs().max() < 1e-5
print(peak)
"""


@pytest.mark.slow
def test_compiled_padded_forward_never_builds_s_by_s_scores():
    """torch.compile(model) on a padded batch traces the no-unpadding path (pack_for_tracing): its kernels
    must not build (B, H, S, S) scores. Peak memory above the compiled call's start, 1 x 4096 tokens with 4 heads:
    far below one S x S fp32 matrix of one head (64 MiB), where the eager reference's scores and probabilities
    for 4 heads (512 MiB; run uncompiled) show that the measurement sees them. Each in a fresh process (the peak
    is per process)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a peak")
    one_matrix = 4096 * 4096 * 4

    def peak(impl):
        run = subprocess.run(
            [sys.executable, "-c", COMPILED_PEAK, impl], cwd=HERE, capture_output=True, text=True, timeout=600
        )
        assert run.returncode == 0, run.stderr[-2000:]
        return int(run.stdout.split()[-1])

    assert peak("") < one_matrix / 8, "the compiled padded forward builds S x S scores"  # the default kernels
    assert peak("eager") > 4 * one_matrix, "the measurement misses the eager reference's S x S scores"


@pytest.mark.slow
@needs_transformers
@needs_tokenizer
def test_seed_doc_padding_free_example_compiles_with_fullgraph(demo_checkpoint):
    """../shared/seeds' padding-free example, line for line against our model (AutoTokenizer, the collator,
    `model(**inputs)`, then `model.forward = torch.compile(model.forward, fullgraph=True)`): the same
    numbers as the texts padded, no graph break, and no recompile for a third shape."""
    from transformers import AutoTokenizer, DataCollatorWithFlattening

    tokenizer = AutoTokenizer.from_pretrained(demo_checkpoint)
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    model = mb.ModernBertForMaskedLM.from_pretrained(demo_checkpoint)

    def prepare_text_for_padding_free(texts):
        inputs_dict = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
        flattened_features = collator(
            [
                {"input_ids": i[a.bool()].tolist()}
                for i, a in zip(inputs_dict["input_ids"], inputs_dict["attention_mask"])
            ]
        )
        return {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in flattened_features.items()}

    texts = [["The capital of France is [MASK].", "ModernBERT is a [MASK] model."], TEXTS[:3], TEXTS[1:]]
    eager = [model(**prepare_text_for_padding_free(t)) for t in texts]
    fresh_dynamo()
    model.forward = torch.compile(model.forward, fullgraph=True)  # fullgraph: a graph break is an error
    for t, ref in zip(texts, eager):
        out = model(**prepare_text_for_padding_free(t))
        assert_close(out.logits, ref.logits, 1e-4, "compiled vs eager logits")
        assert_close(out.loss, ref.loss, 1e-5, "compiled vs eager loss")
        padded = tokenizer(t, return_tensors="pt", padding=True)
        with torch.no_grad():
            alone = model.__class__.forward(model, **padded).logits[padded["attention_mask"].bool()]
        assert_close(out.logits[0], alone, 1e-4, "packed vs padded")
    assert graphs_compiled() <= 2, "dynamo's automatic dynamic shapes: one graph, one more when a shape first changes"


@pytest.mark.gpu
@needs_gpu
def test_flex_on_gpu_trains_and_compiles_the_whole_forward():
    """FlexAttention where it runs for real (Triton): in fp32, the loss and every gradient equal the sdpa
    kernel's; and the whole forward compiled (block masks built inside the graph), on packed input with
    fullgraph and on padded batches, equals eager, without compiling again for a third shape."""
    torch.manual_seed(0)
    config = mb.ModernBertConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4
    )
    model = mb.ModernBertForTokenClassification(config).cuda()
    ids, mask = ragged_batch(config, [300, 129, 64, 5], left=(1,))
    ids, mask = ids.cuda(), mask.cuda()
    labels = torch.randint(0, 2, ids.shape, device="cuda").masked_fill(mask == 0, -100)
    grads = {}
    for impl in ("sdpa", "flex_attention"):
        model.config.attn_implementation = impl
        model.zero_grad(set_to_none=True)
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads[impl] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    for i, (a, b) in enumerate(zip(grads["flex_attention"], grads["sdpa"])):
        assert_close(a, b, 1e-4 * max(1.0, b.abs().max().item()), f"flex vs sdpa, loss (0) or gradient {i}")
    model.eval()
    for packed in (True, False):  # as test_compiled_forward_equals_eager, with Inductor
        batches = [
            {k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()} for b in three_batches(config, packed)
        ]
        with torch.no_grad():
            eager = [model(**batch).logits for batch in batches]  # (eager flex compiles its own kernel: count after)
            fresh_dynamo()
            whole = torch.compile(model.forward, fullgraph=packed, dynamic=True)
            for batch, ref in zip(batches, eager):
                assert_close(whole(**batch).logits, ref, 1e-4, f"compiled flex, packed={packed}")
        assert graphs_compiled() <= 2, "a new batch shape compiled again"
    model.config.attn_implementation = None


# ----------------------------------------------------------------------------------------------------
# Export: torch.export with dynamic batch and sequence, and ONNX through onnxruntime


@pytest.mark.slow
@pytest.mark.parametrize("cls_name", ["ModernBertModel", "ModernBertForMaskedLM"])
def test_torch_export_with_dynamic_batch_and_sequence(small, cls_name):
    model = small[cls_name]
    first, other = three_batches(model.config)[:2]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=model.config.max_position_embeddings)
    program = torch.export.export(
        model, (first["input_ids"], first["attention_mask"]), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq})
    )
    with torch.no_grad():
        a, b = program.module()(other["input_ids"], other["attention_mask"]), model(**other)
    for key in b:
        assert_close(a[key], b[key], 1e-5, f"{cls_name} {key}, exported vs eager")


@pytest.mark.slow
def test_exported_program_serves_lengths_past_one_attention_block():
    """An example shorter than one +-64 block must not fix the exported program to short inputs (blocked and
    flex attention cut the stream into blocks; the exporters keep the eager reference, which does not)."""
    torch.manual_seed(0)
    config = mb.ModernBertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4
    )
    model = mb.ModernBertModel(config).eval()
    short, long = (torch.randint(1, 64, (2, n)) for n in (8, 300))
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=8192)}
    program = torch.export.export(model, (short, torch.ones_like(short)), dynamic_shapes=(dims, dims))
    with torch.no_grad():
        out = program.module()(long, torch.ones_like(long))["last_hidden_state"]
        assert_close(out, model(long).last_hidden_state, 1e-5, "exported at 2 x 8, run at 2 x 300")


ONNX_OUTPUTS = {  # one head with two outputs (docs/huggingface.md's masked LM is run by its own test)
    "ModernBertForQuestionAnswering": ["start_logits", "end_logits"],
}


@pytest.mark.slow
@pytest.mark.parametrize("cls_name", sorted(ONNX_OUTPUTS))
def test_onnx_export_runs_in_onnxruntime_with_transformers_names(small, cls_name):
    """Exported as docs/huggingface.md does: inputs input_ids, attention_mask and outputs named as transformers'
    outputs (and optimum's ONNX exports), with the axes batch_size and sequence_length. (docs/huggingface.md's own
    snippet, run by test_docs_hugging_face_snippets, is checked for the masked LM's logits.)"""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime (test-only) is not installed")
    pytest.importorskip("onnxscript", reason="onnxscript (needed by torch.onnx.export(dynamo=True)) is not installed")
    model = small[cls_name]
    first, other = three_batches(model.config)[:2]
    if transformers is not None:  # the names are the official model's output fields
        official = getattr(transformers, cls_name)(transformers.ModernBertConfig(**model.config.to_dict())).eval()
        assert list(official(**first).keys()) == ONNX_OUTPUTS[cls_name]
    dims = {0: torch.export.Dim("batch_size"), 1: torch.export.Dim("sequence_length", max=8192)}
    args = (first["input_ids"], first["attention_mask"])
    with torch.no_grad():
        outputs = model(*args)
    program = torch.onnx.export(
        model, args, dynamic_shapes=(dims, dims), output_names=list(outputs), dynamo=True, verbose=False
    )
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ONNX_OUTPUTS[cls_name]
    assert session.get_inputs()[0].shape == ["batch_size", "sequence_length"]
    results = session.run(None, {k: other[k].numpy() for k in ("input_ids", "attention_mask")})
    with torch.no_grad():
        expected = model(**other)
    for name, result in zip(ONNX_OUTPUTS[cls_name], results):
        assert_close(torch.from_numpy(result), expected[name], 1e-4, f"{cls_name} {name}: onnxruntime vs eager")


# ----------------------------------------------------------------------------------------------------
# Gradient checkpointing: set_checkpointing


def saved_for_backward_bytes(fn):
    """Bytes of the tensors autograd keeps for the backward pass while fn() runs: the activation memory
    that gradient checkpointing exists to cut (measured exactly, where peak RSS on a CPU is noise)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


@pytest.mark.slow
def test_gradient_checkpointing_same_gradients_less_activation_memory():
    torch.manual_seed(0)
    config = mb.ModernBertConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        local_attention=16,
        max_position_embeddings=4096,
        pad_token_id=0,
    )
    model = mb.ModernBertForTokenClassification(config).train()
    ids = torch.randint(1, 64, (1, 2048))
    labels = torch.randint(0, 2, (1, 2048))
    grads, saved = [], []
    for enable in (False, True):
        model.gradient_checkpointing_enable() if enable else model.gradient_checkpointing_disable()
        model.zero_grad()
        out, nbytes = saved_for_backward_bytes(lambda: model(ids, labels=labels))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        saved.append(nbytes)
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], 1e-6, f"grad of {name} with checkpointing")
    # 6 layers, 2048 tokens, hidden 64: 20.4 MB kept for backward without checkpointing, 3.3 MB with (-84%).
    assert saved[1] < 0.25 * saved[0], f"checkpointing kept {saved[1] / 1e6:.1f} MB of {saved[0] / 1e6:.1f} MB"
    with pytest.raises(ValueError, match="every layer"):
        model.gradient_checkpointing_enable(every_n_layers=2)


@pytest.mark.gpu
@needs_gpu
def test_gradient_checkpointing_lowers_peak_gpu_memory():
    """ModernBERT-base dimensions (4 layers), one 8192-token sequence, bf16: peak memory of forward + backward."""
    torch.manual_seed(0)
    config = mb.ModernBertConfig(num_hidden_layers=4)
    model = mb.ModernBertForTokenClassification(config).cuda().bfloat16().train()
    ids, labels = torch.randint(0, 50000, (1, 8192), device="cuda"), torch.randint(0, 2, (1, 8192), device="cuda")
    peaks = []
    for enable in (False, True):
        model.gradient_checkpointing_enable() if enable else model.gradient_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(ids, labels=labels).loss.backward()
        torch.cuda.synchronize()
        peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20)
    print(f"peak MB above the weights, without / with gradient checkpointing: {peaks[0]:.0f} / {peaks[1]:.0f}")
    assert peaks[1] < 0.7 * peaks[0], peaks


# ----------------------------------------------------------------------------------------------------
# The Hugging Face stack: training with DDP and with transformers.Trainer, and the snippets of docs/huggingface.md
# and README's "With the Hugging Face stack", every one run in order as written


def ddp_worker(rank, folder, result):
    """One of two DDP processes (gloo, CPU): a training step on its half of the batch."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    model = torch.nn.parallel.DistributedDataParallel(
        mb.ModernBertForSequenceClassification.from_pretrained(folder).train()
    )
    batch = torch.load(f"{folder}/batch.pt")
    half = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
    model(**half).loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, result)
    dist.barrier()  # both done before either tears down (one rank once hung, left alone in destroy)
    dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown: a rank once hung in it, after its work was done


@pytest.mark.slow
def test_ddp_two_processes_give_the_gradients_of_one(tmp_path, small):
    model = small["ModernBertForSequenceClassification"]
    model.save_pretrained(tmp_path)
    batch = dict(
        input_ids=torch.randint(1, 64, (4, 12)),
        attention_mask=torch.ones(4, 12, dtype=torch.long),
        labels=torch.tensor([0, 1, 1, 0]),
    )
    batch["attention_mask"][1, 7:] = 0
    batch["attention_mask"][2, :4] = 0
    torch.save(batch, tmp_path / "batch.pt")
    workers = torch.multiprocessing.start_processes(
        ddp_worker, args=(str(tmp_path), str(tmp_path / "grads.pt")), nprocs=2, start_method="spawn", join=False
    )
    deadline = time.monotonic() + 180
    while not workers.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for p in workers.processes:
                p.kill()
            pytest.fail("the DDP workers did not finish within 3 minutes")
    ddp = torch.load(tmp_path / "grads.pt")
    single = mb.ModernBertForSequenceClassification.from_pretrained(tmp_path).train()
    single(**batch).loss.backward()  # the mean over 4 sequences; DDP averages the two halves' means
    for name, p in single.named_parameters():
        assert_close(ddp[name], p.grad, 1e-5, f"DDP grad of {name}")  # fp32 sums in another order


@pytest.mark.slow
@needs_transformers
@pytest.mark.parametrize("cls_name", ["ModernBertForSequenceClassification", "ModernBertForMaskedLM"])
def test_transformers_trainer_trains_evaluates_and_predicts(cls_name, tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (test-only)")
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments, default_data_collator

    torch.manual_seed(0)
    config = mb.ModernBertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        local_attention=8,
        max_position_embeddings=128,
        pad_token_id=0,
        num_labels=2,
    )
    model = getattr(mb, cls_name)(config)
    g = torch.Generator().manual_seed(0)
    if cls_name == "ModernBertForMaskedLM":  # padding-free, straight from the collator
        data = [
            {"input_ids": torch.randint(1, 64, (int(n),), generator=g).tolist()}
            for n in torch.randint(4, 20, (32,), generator=g)
        ]
        data = [d | {"labels": d["input_ids"]} for d in data]
        collator = DataCollatorWithFlattening()
    else:  # a learnable rule: label 1 iff token 5 appears
        ids = torch.randint(6, 64, (32, 10), generator=g)
        ids[::2, 3] = 5
        data = [
            {"input_ids": i, "attention_mask": torch.ones(10, dtype=torch.long), "labels": int(5 in i)} for i in ids
        ]
        collator = default_data_collator
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=40,
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        logging_steps=5,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8], data_collator=collator)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < 0.8 * losses[0], f"training loss did not go down: {losses}"
    assert trainer.evaluate()["eval_loss"] < losses[0]
    predictions = trainer.predict(data[:8])
    assert predictions.predictions is not None and predictions.metrics["test_loss"] > 0


@pytest.mark.slow
@needs_transformers
@needs_tokenizer
# Trainer pins memory by default, and says so on a machine without an accelerator, like this one.
@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator is found:UserWarning")
def test_docs_hugging_face_snippets(demo_checkpoint, tmp_path, monkeypatch):
    """With the small demo checkpoint in place of the hub id (test_docs.py skips them: they need the hub), and what
    each gives checked: the logits' shapes, Trainer's saved checkpoint, the ONNX file's names, README's save."""
    for module, why in (("accelerate", "Trainer"), ("onnxscript", "the ONNX export")):
        pytest.importorskip(module, reason=f"{module} (test-only, for {why}) is not installed")
    page = Path(HERE, "docs", "huggingface.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(snippets) == 5, "the collator, Trainer, checkpointing, compile and export snippets"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for snippet in snippets:
        snippet = snippet.replace('"answerdotai/ModernBERT-base"', repr(str(demo_checkpoint)))
        if "num_labels=2" not in snippet:
            exec(snippet, namespace)
            continue
        with pytest.warns(
            UserWarning, match=r"initialised fresh \['classifier.weight', 'classifier.bias'\]"
        ) as loaded:
            exec(snippet, namespace)  # the classifier from a masked-LM checkpoint: the loader says what it did
        assert [w.filename for w in loaded if "initialised fresh" in str(w.message)] == ["<string>"]
    assert namespace["out"].logits.shape[:2] == namespace["inputs"]["input_ids"].shape
    assert (tmp_path / "out" / "final" / "config.json").is_file() and (tmp_path / "modernbert.onnx").is_file()
    assert namespace["logits"].shape[:2] == namespace["batch"]["input_ids"].shape
    session = pytest.importorskip("onnxruntime").InferenceSession(str(tmp_path / "modernbert.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["logits"], "transformers' name for the masked LM's output"
    assert session.get_outputs()[0].shape[:2] == ["batch_size", "sequence_length"]
    readme = Path(HERE, "README.md").read_text().split("## With the Hugging Face stack")[1].split("\n## ")[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    exec(snippet.replace('"answerdotai/ModernBERT-base"', repr(str(demo_checkpoint))), {})
    assert (tmp_path / "my-modernbert" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------
# Loading and saving: checkpoint_folder, load_checkpoint, single_device, save_checkpoint. Hostile, broken, partial
# and sharded folders; transformers' spellings of from_pretrained's arguments; saving is atomic; hub ids resolve
# through the Hugging Face cache.


@pytest.fixture
def checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    model, _, _ = load_case("mlm")
    model.save_pretrained(folder)
    return folder, load_file, save_file


def test_loader_refuses_missing_pickled_truncated_and_corrupt_checkpoints(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    with pytest.raises(FileNotFoundError, match="no such folder"):
        mb.ModernBertModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        mb.ModernBertModel.from_pretrained(tmp_path / "empty")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickled weights.*safetensors"):
        mb.ModernBertModel.from_pretrained(pickled)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        mb.ModernBertModel.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      " + data[100:])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        mb.ModernBertModel.from_pretrained(folder)


def test_loader_refuses_wrong_shapes_and_missing_backbone_weights(checkpoint):
    folder, load_file, save_file = checkpoint
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 50}))
    with pytest.raises(
        ValueError, match=r"model.layers.0.mlp.Wi.weight has shape \(96, 32\), but the config needs \(100, 32\)"
    ):
        mb.ModernBertForMaskedLM.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    del tensors["model.layers.2.mlp_norm.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match="lacks backbone weight 'model.layers.2.mlp_norm.weight'"):
        mb.ModernBertForMaskedLM.from_pretrained(folder)


def test_loader_moves_backbones_between_classes_and_reports_it(checkpoint, tmp_path):
    folder, load_file, save_file = checkpoint
    mlm = mb.ModernBertForMaskedLM.from_pretrained(folder)
    assert mlm.load_report == {"dropped": [], "initialised": [], "tied": ["decoder.weight"]}
    assert mlm.decoder.weight is mlm.model.embeddings.tok_embeddings.weight
    with pytest.warns(UserWarning, match="initialised fresh"):
        clf = mb.ModernBertForSequenceClassification.from_pretrained(folder, num_labels=4)
    assert clf.load_report["dropped"] == ["decoder.bias"]
    assert clf.load_report["initialised"] == ["classifier.weight", "classifier.bias"]
    assert clf.config.num_labels == 4 and clf.classifier.weight.shape == (4, 32)
    with pytest.warns(UserWarning, match="dropped"):
        backbone = mb.ModernBertModel.from_pretrained(folder)
    assert backbone.load_report["dropped"] == ["decoder.bias", "head.dense.weight", "head.norm.weight"]
    torch.testing.assert_close(backbone.state_dict(), mlm.model.state_dict(), rtol=0, atol=0)
    # a bare backbone (no "model." prefix: embedding models fine-tuned from ModernBERT) into a task class
    backbone.save_pretrained(tmp_path / "bare")
    assert not any(k.startswith("model.") for k in load_file(tmp_path / "bare" / "model.safetensors"))
    with pytest.warns(UserWarning):
        mlm2 = mb.ModernBertForMaskedLM.from_pretrained(tmp_path / "bare")
    assert mlm2.load_report["initialised"] == ["head.dense.weight", "head.norm.weight", "decoder.bias"]
    torch.testing.assert_close(mlm2.model.state_dict(), mlm.model.state_dict(), rtol=0, atol=0)


def test_loader_reads_sharded_checkpoints(checkpoint, tmp_path):
    folder, load_file, save_file = checkpoint
    tensors = load_file(folder / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((folder / "config.json").read_text())
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, sharded / file)
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in parts.items() for k in ks}})
    )
    a, b = mb.ModernBertForMaskedLM.from_pretrained(sharded), mb.ModernBertForMaskedLM.from_pretrained(folder)
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)


def test_loader_sets_dtype_and_attention(checkpoint):
    folder, _, _ = checkpoint
    model = mb.ModernBertForMaskedLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.config.attn_implementation == "eager" and not model.training


@pytest.mark.parametrize(
    "kwargs, device, dtype",
    [
        (dict(device_map="auto"), "cpu", torch.float32),  # no accelerator here
        (dict(device_map="cpu"), "cpu", torch.float32),
        (dict(device_map=torch.device("cpu")), "cpu", torch.float32),
        (dict(device_map={"": "cpu"}), "cpu", torch.float32),
        (dict(device_map="meta"), "meta", torch.float32),  # not the CPU: the map is obeyed
        (dict(torch_dtype=torch.bfloat16), "cpu", torch.bfloat16),
        (dict(dtype="float16"), "cpu", torch.float16),
    ],
    ids=["auto", "cpu", "torch.device", "whole-model-dict", "meta", "torch_dtype", "dtype-name"],
)
def test_from_pretrained_reads_transformers_spellings(checkpoint, kwargs, device, dtype):
    folder, _, _ = checkpoint
    if "torch_dtype" in kwargs:
        with pytest.warns(FutureWarning, match="`torch_dtype` is deprecated! Use `dtype` instead!") as caught:
            model = mb.ModernBertForMaskedLM.from_pretrained(folder, **kwargs)
        assert {w.filename for w in caught} == {__file__}  # the warning points at the caller's line
    else:
        model = mb.ModernBertForMaskedLM.from_pretrained(folder, **kwargs)
    assert (model.device.type, model.dtype) == (device, dtype)


def test_device_map_names_one_device(monkeypatch):
    assert mb.single_device("cuda") == torch.device("cuda")
    assert mb.single_device("cuda:1") == mb.single_device(1) == torch.device("cuda:1")
    assert mb.single_device({"": "cuda:0"}) == mb.single_device(torch.device("cuda:0")) == torch.device("cuda:0")
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    assert mb.single_device("auto") == torch.device("cuda"), "auto is the GPU where there is one"


def test_one_device_picker_for_every_door(monkeypatch):
    """modernbert.pick_device: a named device, or the accelerator torch sees (MPS too), else the CPU; a GPU named
    where there is none is an error. load.py and embed.py use it (bench.py on its own devices: test_bench.py)."""
    import embed
    import load

    assert load.pick_device is embed.pick_device is mb.pick_device
    assert mb.pick_device("cpu") == mb.pick_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)
    assert mb.pick_device() == mb.pick_device("auto") == mb.single_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="torch sees no CUDA GPU here"):
        mb.pick_device("cuda")
    mps = torch.device("mps")
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: mps)
    assert mb.pick_device() == mb.single_device("auto") == mps  # load.py's own picker used to ignore MPS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert mb.pick_device() == mb.pick_device("cuda") == torch.device("cuda")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            dict(device_map={"model": 0, "head": 1}),
            ValueError,
            r"device_map=\{'model': 0, 'head': 1\} does not name one",
        ),
        (dict(device_map="balanced"), ValueError, "device_map='balanced' does not name one device"),
        (dict(device_map=-1), ValueError, "device_map=-1 does not name one device"),
        (
            dict(device_map="cuda:1", device="cpu"),
            ValueError,
            r"device='cpu' and device_map='cuda:1' \(cuda:1\) disagree",
        ),
        (dict(torch_dtype=torch.float16, dtype=torch.bfloat16), TypeError, "Pass dtype or torch_dtype"),
        (dict(dtype="auto"), ValueError, r"Unknown dtype 'auto': pass a torch dtype"),
        (dict(hiden_size=12345), TypeError, "Unexpected keyword argument 'hiden_size': no ModernBertConfig field"),
        (dict(trust_remote_code=True), TypeError, "Unexpected keyword argument 'trust_remote_code'"),
        (dict(low_cpu_mem_usage=True), TypeError, "Unexpected keyword argument 'low_cpu_mem_usage'"),
    ],
    ids=[
        "map-over-two-devices",
        "balanced",
        "negative",
        "device-disagrees",
        "both-dtypes",
        "dtype-auto",
        "typo",
        "trust_remote_code",
        "low_cpu_mem_usage",
    ],
)
def test_from_pretrained_refuses_what_it_cannot_honour_before_downloading(kwargs, error, message):
    """Checked before the name is looked up: a hub id that is not there does not get in the way."""
    with pytest.raises(error, match=message):
        mb.ModernBertForMaskedLM.from_pretrained("nobody/not-downloaded", **kwargs)
    with pytest.raises(error, match=message):
        load_model("nobody/not-downloaded", **kwargs)  # the same reading of every keyword, dtype names included


def test_warnings_point_past_every_file_of_the_project(checkpoint):
    """One mechanism (modernbert.users_line over LIBRARY_FILES) for every door: the loader's report and the
    deprecated torch_dtype point at the line that called from_pretrained or load.py's load_model."""
    import embed
    import load

    folder = checkpoint[0]
    assert {mb.__file__, load.__file__, embed.__file__} <= mb.LIBRARY_FILES
    doors = {
        "from_pretrained": lambda: mb.ModernBertForSequenceClassification.from_pretrained(folder),
        "torch_dtype": lambda: mb.ModernBertModel.from_pretrained(folder, torch_dtype=torch.float32),
        "load_model": lambda: load.load_model(folder, task="sequence-classification"),
    }
    for door, call in doors.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert caught, door
        assert {w.filename for w in caught} == {__file__}, (door, [(w.filename, w.lineno) for w in caught])


def test_download_options_reach_the_hub_client(checkpoint, monkeypatch, tmp_path):
    import huggingface_hub

    folder, _, _ = checkpoint
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append(kw) or str(folder))
    options = dict(cache_dir=str(tmp_path), local_files_only=True, token="hf_x")
    mb.ModernBertForMaskedLM.from_pretrained("nobody/tiny", revision="v1", **options)
    load_model("nobody/tiny", revision="v1", **options)
    assert mb.ModernBertConfig.from_pretrained("nobody/tiny", revision="v1", **options).hidden_size == 32
    assert [{k: kw[k] for k in (*options, "revision")} for kw in asked] == [{**options, "revision": "v1"}] * 3
    with pytest.raises(TypeError, match="hiden_size"):
        mb.ModernBertConfig.from_pretrained(folder, hiden_size=1)
    mb.ModernBertForMaskedLM.from_pretrained(folder, **options)  # a folder needs no download: nothing to apply
    assert len(asked) == 3


def test_hub_timeouts_go_to_the_hub_client_not_to_the_environment(checkpoint, monkeypatch):
    """huggingface_hub reads HF_HUB_* variables once, when imported: set later they do nothing but reach every
    other library of the process. The timeout goes to the call instead."""
    import huggingface_hub

    folder, _, _ = checkpoint
    for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append(kw) or str(folder))
    environment = dict(os.environ)
    mb.ModernBertForMaskedLM.from_pretrained("nobody/tiny")
    assert dict(os.environ) == environment
    assert asked[0]["etag_timeout"] == 10


def test_a_name_that_is_neither_folder_nor_cached_says_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError) as e:
        mb.checkpoint_folder("my-checkpoint", cache_dir=tmp_path / "cache", local_files_only=True)
    assert str(e.value).startswith(
        f"Could not get 'my-checkpoint': no such folder here ({tmp_path / 'my-checkpoint'}), and as a hub id the "
        "local cache does not have it and local_files_only=True kept the Hugging Face hub from being asked"
    ), e.value
    with pytest.raises(FileNotFoundError) as e:
        mb.checkpoint_folder("my checkpoint")  # not a hub id either
    assert str(e.value).startswith(
        f"No checkpoint at 'my checkpoint': no such folder here ({tmp_path / 'my checkpoint'}), and not a valid hub id"
    ), e.value


@needs_transformers
def test_saved_checkpoints_load_in_transformers(checkpoint):
    folder, _, _ = checkpoint
    ours = mb.ModernBertForMaskedLM.from_pretrained(folder)
    official = transformers.ModernBertForMaskedLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    ids, mask = ragged_batch(official.config, [100, 40], left=(1,))
    with torch.no_grad():
        m = mask.bool()
        assert_close(
            ours(ids, attention_mask=mask).logits[m],
            official(ids, attention_mask=mask).logits[m],
            FP32_TOL,
            "after save_pretrained",
        )


def test_a_failed_save_leaves_nothing_behind_and_keeps_the_old_checkpoint(small, tmp_path, monkeypatch):
    import safetensors.torch

    model = small["ModernBertForMaskedLM"]
    model.save_pretrained(tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    real_save = safetensors.torch.save_file

    def dies_halfway(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_halfway)
    for target in ("new", "old"):
        with pytest.raises(OSError, match="No space left"):
            model.save_pretrained(tmp_path / target)
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"], "no staging folder left behind"
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    model.save_pretrained(tmp_path / "old")  # overwriting works, and reads back
    torch.testing.assert_close(
        mb.ModernBertForMaskedLM.from_pretrained(tmp_path / "old").state_dict(), model.state_dict(), rtol=0, atol=0
    )


def test_saving_over_a_sharded_checkpoint_replaces_it_whole(small, tmp_path, monkeypatch):
    """No old shard stays beside the new model.safetensors, other files stay, and the old index goes only once the
    new weights are in place: a save that dies moving them in leaves the old checkpoint, whole."""
    from safetensors.torch import load_file, save_file

    old, folder = small["ModernBertForMaskedLM"], tmp_path / "ckpt"
    old.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, folder / file)
    weight_map = {k: file for file, keys in parts.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "tokenizer.json").write_text("{}")
    torch.manual_seed(1)
    new = mb.ModernBertForMaskedLM(old.config).eval()

    def loads_as(model):
        loaded = mb.ModernBertForMaskedLM.from_pretrained(folder).state_dict()
        torch.testing.assert_close(loaded, model.state_dict(), rtol=0, atol=0)

    real_replace = os.replace

    def dies_moving_the_weights_in(src, dst):
        if os.path.basename(dst) == "model.safetensors":
            raise OSError("Input/output error")
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", dies_moving_the_weights_in)
        with pytest.raises(OSError, match="Input/output error"):
            new.save_pretrained(folder)
    loads_as(old)
    new.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loads_as(new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "no staging folder left behind"


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_saved_checkpoints_get_the_modes_of_the_umask(small, tmp_path, umask):
    """Others on a shared server can read a checkpoint as far as the umask allows: the folder gets what
    transformers' save_pretrained gives it (os.makedirs), every file what open() gives a new file. (safetensors
    0.8 writes its files 0600 whatever the umask, in transformers' checkpoints too: its issue #782.)"""
    old = os.umask(umask)
    try:
        small["ModernBertForMaskedLM"].save_pretrained(tmp_path / "ours")
        (tmp_path / "plain.txt").write_text("a file made by open()")
        if transformers is not None:
            transformers.ModernBertForMaskedLM.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "theirs")
    finally:
        os.umask(old)
    folder_mode = (tmp_path / "theirs").stat().st_mode & 0o777 if transformers is not None else 0o777 & ~umask
    file_mode = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert (tmp_path / "ours").stat().st_mode & 0o777 == folder_mode == 0o777 & ~umask
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ours").iterdir()} == {
        "config.json": file_mode,
        "model.safetensors": file_mode,
    }


HUB_CHECK = """
import sys, modernbert as mb
for revision in (None, sys.argv[1], "v2.0"):  # the default branch, a commit, a revision not in the cache
    try:
        model = mb.ModernBertForMaskedLM.from_pretrained("nobody/tiny-modernbert", revision=revision)
        print(model.num_parameters(), mb.ModernBertConfig.from_pretrained("nobody/tiny-modernbert").hidden_size)
    except Exception as e:
        print(type(e).__name__ + ": " + str(e))
"""


@pytest.mark.slow
def test_from_pretrained_takes_a_hub_id_through_the_cache(small, tmp_path):
    """A hub id resolves through the Hugging Face cache (filled here by hand, as snapshot_download leaves
    it), offline; a revision picks the snapshot; what is not in the cache is a one-line error. One process, as
    the cache's place is read when huggingface_hub is imported."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--nobody--tiny-modernbert"
    small["ModernBertForMaskedLM"].save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": HERE}
    p = subprocess.run(
        [sys.executable, "-c", HUB_CHECK, commit], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert p.returncode == 0, p.stderr
    found = f"{small['ModernBertForMaskedLM'].num_parameters()} 32"
    default, by_commit, missing = p.stdout.splitlines()
    assert default == found and by_commit == found, p.stdout
    assert "Could not get 'nobody/tiny-modernbert'" in missing, missing


# ----------------------------------------------------------------------------------------------------
# Input checks: a clear error naming the problem for every malformed input (check_inputs, check_packed,
# check_labels, check_multiple_choice), never a NaN or a silent wrong result


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(input_ids=torch.tensor([[1, 2, 64]])), r"\[0, 64\).*\[1, 64\]"),
        (dict(input_ids=torch.tensor([[1, -2, 3]])), r"\[0, 64\)"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), "integer tensor"),
        (dict(input_ids=torch.tensor([[True, False]])), "integer tensor"),
        (dict(input_ids=torch.tensor([1, 2, 3])), r"\(batch, seq_len\)"),
        (dict(input_ids=torch.zeros(0, 5, dtype=torch.long)), "Empty batch"),
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), "Empty batch"),
        (dict(input_ids=torch.ones(1, 129, dtype=torch.long)), "129 tokens, more than max_position_embeddings = 128"),
        (
            dict(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4)),
            r"attention_mask has shape \(2, 4\)",
        ),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.full((2, 5), 2)), "only 0 .* and 1"),
        (
            dict(input_ids=torch.ones(1, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 2, 4])),
            "rise from 0 to the packed length 5",
        ),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 5])), r"shape \(1, T\)"),
        (dict(input_ids=torch.ones(1, 5, dtype=torch.long), inputs_embeds=torch.ones(1, 5, 32)), "exactly one"),
        (dict(inputs_embeds=torch.ones(1, 5, 31)), "inputs_embeds must have shape"),
    ],
)
def test_bad_inputs_are_clear_errors(small, bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        small["ModernBertModel"](**bad)


@pytest.mark.parametrize(
    "cls_name, kwargs, message",
    [
        (
            "ModernBertForMaskedLM",
            dict(labels=torch.zeros(2, 4, dtype=torch.long)),
            r"labels has shape \(2, 4\), expected \(2, 6\)",
        ),
        ("ModernBertForMaskedLM", dict(labels=torch.zeros(2, 6, dtype=torch.long)), "padded positions must be -100"),
        (
            "ModernBertForTokenClassification",
            dict(labels=torch.zeros(2, 6, dtype=torch.long)),
            "padded positions must be -100",
        ),
        (
            "ModernBertForSequenceClassification",
            dict(labels=torch.zeros(3, dtype=torch.long)),
            "3 rows for 2 sequences",
        ),
        (
            "ModernBertForQuestionAnswering",
            dict(start_positions=torch.zeros(3, dtype=torch.long), end_positions=torch.zeros(3, dtype=torch.long)),
            r"start_positions has shape \(3,\), expected \(2,\)",
        ),
        (
            "ModernBertForQuestionAnswering",
            dict(start_positions=torch.zeros(2, dtype=torch.long)),
            "both start_positions and end_positions",
        ),
    ],
)
def test_mismatched_labels_are_clear_errors(small, cls_name, kwargs, message):
    ids = torch.ones(2, 6, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with pytest.raises(ValueError, match=message):
        small[cls_name](ids, attention_mask=mask, **kwargs)


def test_multiple_choice_shapes_are_checked(small):
    model = small["ModernBertForMultipleChoice"]
    with pytest.raises(ValueError, match=r"\(batch, num_choices, seq_len\)"):
        model(torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 6\), expected \(2, 3, 6\)"):
        model(torch.ones(2, 3, 6, dtype=torch.long), attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match=r"labels has shape \(3,\), expected \(2,\)"):
        model(torch.ones(2, 3, 6, dtype=torch.long), labels=torch.zeros(3, dtype=torch.long))
    assert model(torch.ones(2, 3, 6, dtype=torch.long)).logits.shape == (2, 3)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(cu_seq_lens_k=torch.tensor([0, 4, 5, 9], dtype=torch.int32)),
            "boundaries disagree: cu_seq_lens_q gives \\[0, 3, 5, 9\\], cu_seq_lens_k \\[0, 4, 5, 9\\]",
        ),
        (
            dict(cu_seq_lens_q=torch.tensor([0, 4, 5, 9]), cu_seq_lens_k=torch.tensor([0, 4, 5, 9])),
            r"disagree: cu_seq_lens_q gives \[0, 4, 5, 9\], position_ids \[0, 3, 5, 9\]",
        ),
        (dict(max_length_q=3, max_length_k=3), "max_length_q = 3 is below the longest packed sequence, 4 tokens"),
        (dict(position_ids=torch.tensor([[0, 1, 2, 5, 6, 0, 1, 2, 3]])), "restart at 0"),
        (dict(position_ids=torch.tensor([[1, 2, 3, 0, 1, 0, 1, 2, 3]])), "restart at 0"),
        (dict(position_ids=torch.arange(8)[None]), r"position_ids has shape \(1, 8\), expected \(1, 9\)"),
        (dict(seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2]])), "seq_idx does not number"),
        (
            dict(cu_seqlens=torch.tensor([0, 3, 6, 9])),
            r"boundaries disagree: cu_seqlens gives \[0, 3, 6, 9\], cu_seq_lens_q \[0, 3, 5, 9\]",
        ),
        (dict(attention_mask=torch.ones(1, 9)), r"shape \(1, T\) with no attention_mask"),
        (dict(cu_seq_lens_q=None, cu_seq_lens_k=None, position_ids=None), "needs its boundaries"),
    ],
)
def test_inconsistent_packing_is_a_clear_error(small, change, message):
    inputs = {k: v for k, v in {**_packed([3, 2, 4]), **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        small["ModernBertModel"](**inputs)


@pytest.mark.parametrize("cls_name", ["ModernBertModel"] + sorted(HEAD_CASES))
def test_unknown_keyword_arguments_are_a_type_error_naming_them(small, cls_name):
    ids = (
        torch.ones(1, 3, 4, dtype=torch.long)
        if cls_name == "ModernBertForMultipleChoice"
        else torch.ones(1, 4, dtype=torch.long)
    )
    with pytest.raises(TypeError, match="'sliding_window_mask'"):
        small[cls_name](ids, sliding_window_mask=None)
    if cls_name == "ModernBertForMultipleChoice":  # each choice is a padded row: packed input does not apply
        with pytest.raises(TypeError, match="'cu_seqlens'"):
            small[cls_name](ids, cu_seqlens=torch.tensor([0, 4]))
