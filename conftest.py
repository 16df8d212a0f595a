"""What several test files share: the oracles and what skips without them, the real tokenizer's files, the
comparison every test reports with, small checkpoints on disk, and the `--slow` option.

Plain `pytest` runs the fast default: every test not marked `slow`. `pytest --slow` runs everything, and
`pytest --slow -m slow` (or `pytest -m slow`) only the slow ones; pytest.ini lists the commands.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import modernbert as mb

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------
# The fast default: tests marked slow run only with --slow, or when -m names them


def pytest_addoption(parser):
    parser.addoption(
        "--slow",
        action="store_true",
        help="also run the tests marked slow (compile, export, ONNX, DDP, Trainer, subprocesses, sweeps)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow") or re.search(r"(?<!not )\bslow\b", config.getoption("markexpr") or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


# ----------------------------------------------------------------------------------------------------
# The oracles (test-only installs) and the data beside the checkout; a test that needs what is missing skips,
# saying what to install or where to put it

try:
    import transformers

    transformers.logging.set_verbosity_error()
except ImportError:
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers (the oracle) is not installed")
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: run `pytest -m gpu` on a machine with one"
)

SHARED_DATA = Path(os.environ.get("MODERNBERT_SHARED_DATA", Path(HERE).parent / "shared" / "data"))
TOKENIZER_DIR = SHARED_DATA / "modernbert-base"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
NO_TOKENIZER = (
    f"the real tokenizer files are not in {TOKENIZER_DIR}: put ../shared beside the checkout, or set "
    "MODERNBERT_SHARED_DATA to the folder that holds modernbert-base/"
)
HAS_TOKENIZER = (TOKENIZER_DIR / "tokenizer.json").is_file()
needs_tokenizer = pytest.mark.skipif(not HAS_TOKENIZER, reason=NO_TOKENIZER)


# ----------------------------------------------------------------------------------------------------
# Comparing numbers


def assert_close(ours, ref, tol, where):
    """Fails with the max and mean difference and where the max sits."""
    assert ours.shape == ref.shape, f"{where}: shape {tuple(ours.shape)} != official {tuple(ref.shape)}"
    diff = (ours.double() - ref.double()).abs()
    assert torch.isfinite(ours).all(), f"{where}: non-finite values in our output"
    worst = diff.max().item()
    if worst > tol:
        at = tuple(torch.nonzero(diff == diff.max())[0].tolist())
        raise AssertionError(
            f"{where}: max diff {worst:.3g} at {at} (ours {ours[at].item():.6g}, official {ref[at].item():.6g}), "
            f"mean diff {diff.mean().item():.3g}, tol {tol}"
        )


# On a GPU, half precision is judged against fp32 truth: our error must stay within 1.25x of the official
# implementation's own error in the same dtype.
HALF_FACTOR = 1.25


def errors(out, truth):
    diff = (out.double() - truth.double()).abs()
    return diff.max().item(), diff.mean().item()


def within_official_error(ours, official, truth, where):
    """ours and official: half-precision outputs; truth: the official model in fp32. Max and mean errors."""
    (our_max, our_mean), (their_max, their_mean) = errors(ours, truth), errors(official, truth)
    assert our_max <= HALF_FACTOR * their_max and our_mean <= HALF_FACTOR * their_mean, (
        f"{where}: our error max {our_max:.3g} / mean {our_mean:.3g}, the official implementation's own error in the "
        f"same dtype max {their_max:.3g} / mean {their_mean:.3g} (allowed: {HALF_FACTOR}x)"
    )


# ----------------------------------------------------------------------------------------------------
# Small checkpoints on disk: a random-weight ModernBERT with the real tokenizer (the demo checkpoint), and an
# mmBERT-style tokenizer (Gemma's spellings: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4; texts wrapped as
# <bos> ... <eos>), a small BPE trained here by `tokenizers`, for models whose vocabulary matches it.

# local_attention=16 is a +-8 window, so the longer texts below cross it.
TINY = dict(
    vocab_size=50368,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    local_attention=16,
    max_position_embeddings=512,
)
TEXTS = [
    "The capital of France is [MASK].",
    "Plants create [MASK] through a process known as [MASK].",
    "A longer sentence, with [MASK] near the start and more words after it, so that the local window of the small "
    "test model is crossed on the way to the [MASK] at the end.",
    "[MASK]",
]


def spread_weights(model):
    """Random weights under which every layer and every token matters (the default init barely moves the
    residual stream, and ties every top-k to rounding noise)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name == "decoder.bias":
                p.normal_(0.0, 3.0)  # a wide spread: top-k neighbours are far apart, not rounding noise
            elif "tok_embeddings" in name:
                p.normal_(0.0, 1.0)  # tied to the decoder: logits ~ N(0, 8) from the hidden state, so the text matters
            elif p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)  # (out, in) matrices, std 1/sqrt(fan_in)
            else:
                p.normal_(0.0, 0.1)  # biases (a classifier's)
    return model


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory):
    """A folder holding config.json + model.safetensors (TINY, random spread weights) + the real tokenizer files,
    built with transformers (with modernbert.py where transformers is not installed)."""
    if not HAS_TOKENIZER:
        pytest.skip(NO_TOKENIZER)
    folder = tmp_path_factory.mktemp("tiny-modernbert")
    torch.manual_seed(0)
    if transformers is not None:
        model = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**TINY, attn_implementation="sdpa"))
    else:
        model = mb.ModernBertForMaskedLM(mb.ModernBertConfig(**TINY))
    spread_weights(model)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, folder / name)
    return folder


MMBERT_CORPUS = [
    "The capital of France is Paris, a big city on the Seine.",
    "Plants create energy through a process known as photosynthesis.",
    "ModernBERT is an encoder; mmBERT reads many languages, and Ettin comes in six sizes.",
    "Hello world, the weather is lovely today and the sun is out.",
    "What is the best way to search a million documents quickly?",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'()-",
]
MMBERT_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=2, sep_token_id=1)
MMBERT_TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, local_attention=8)


def mmbert_style_tokenizer(folder, mask_in_config=True):
    """tokenizer.json (BPE with ▁ for spaces, as Gemma's; <mask> takes the space before it) + tokenizer_config.json
    (plain strings) + special_tokens_map.json (AddedToken dicts), as the hub's mmBERT folders have them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers

    names = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    specials = [AddedToken(t, special=True, normalized=False, lstrip=t == "<mask>") for t in names]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Replace("▁", " ")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False, max_token_length=6)
    tokenizer.train_from_iterator(MMBERT_CORPUS * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>", special_tokens=[("<bos>", 2), ("<eos>", 1)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    roles = dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", mask_token="<mask>")
    roles |= dict(cls_token="<bos>", sep_token="<eos>")
    config = {k: v for k, v in roles.items() if mask_in_config or k != "mask_token"}
    config |= {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    added = {
        k: {"content": v, "lstrip": v == "<mask>", "normalized": False, "rstrip": False} for k, v in roles.items()
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(added))
    return tokenizer


# ----------------------------------------------------------------------------------------------------
# The command lines, run as a user runs them


def run_cli(*args, env=None, script="load.py"):
    """`python load.py ARGS` (or another script) in a subprocess, as a user runs it: (returncode, stdout,
    stderr, seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    start = time.perf_counter()
    p = subprocess.run(
        [sys.executable, os.path.join(HERE, script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=HERE,
    )
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------
# The real model: needs the hub (pytest -m hub, or MODERNBERT_HUB=1)


@pytest.fixture
def hub(request):
    wanted = os.environ.get("MODERNBERT_HUB") == "1" or re.search(
        r"(?<!not )\bhub\b", request.config.getoption("markexpr") or ""
    )
    if not wanted:
        pytest.skip("downloads answerdotai/ModernBERT-base (~600 MB): run with `pytest -m hub` or MODERNBERT_HUB=1")
    try:  # the download, or the cache; only an unreachable hub skips, any other error fails
        return mb.checkpoint_folder("answerdotai/ModernBERT-base")
    except OSError as e:
        if "the Hugging Face hub could not be reached" not in str(e):
            raise
        pytest.skip(f"needs the internet or a cached answerdotai/ModernBERT-base: {e}")
