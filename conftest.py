"""What several test files share: the oracles and what skips without them, the real tokenizer's files, the
comparison every test reports with, small checkpoints on disk, and the `--slow` option.

Plain `pytest` runs the fast default: every test not marked `slow`. `pytest --slow` runs everything, and
`pytest --slow -m slow` (or `pytest -m slow`) only the slow ones; pytest.ini lists the commands.
"""

import contextlib
import json
import math
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
    if not mb.FLEX_ON_CPU and not torch.cuda.is_available():  # modernbert.py says so in one line
        skip = pytest.mark.skip(reason=f"FlexAttention on a CPU needs torch >= 2.13, this is {torch.__version__}")
        for item in items:
            if "flex" in item.name:
                item.add_marker(skip)
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
# Hostile config.json files: a tiny checkpoint with a word-level tokenizer, copies of it with config.json changed,
# and what each change must be told as (test_modernbert.py checks modernbert.py's doors, test_load.py load.py's)

WORD_TINY = dict(
    vocab_size=8,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    local_attention=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=2,
    cls_token_id=2,
    eos_token_id=3,
    sep_token_id=3,
)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "text", "."]


@pytest.fixture(scope="session")
def word_checkpoint(tmp_path_factory):
    """A whole checkpoint load.py runs: a tiny random model and a word-level tokenizer with [MASK] and [PAD]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    folder = tmp_path_factory.mktemp("word-tiny")
    torch.manual_seed(0)
    mb.ModernBertForMaskedLM(mb.ModernBertConfig(**WORD_TINY)).save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(WORDS[:5])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"mask_token": "[MASK]", "pad_token": "[PAD]"}))
    return folder


def with_config(word_checkpoint, tmp_path, config):
    """A copy of the word-level checkpoint whose config.json holds `config` (a dict of changes, or any JSON
    value)."""
    folder = shutil.copytree(word_checkpoint, tmp_path / "ckpt")
    good = json.loads((word_checkpoint / "config.json").read_text())
    for v5 in ("layer_types", "rope_parameters"):  # the v4 spelling, so a change to a layer count or theta holds
        del good[v5]
    (folder / "config.json").write_text(json.dumps({**good, **config} if isinstance(config, dict) else config))
    return folder


HOSTILE_CONFIGS = {  # what config.json says -> what the message must say (the key, the value, the kind wanted)
    "zero-heads": ({"num_attention_heads": 0}, r"num_attention_heads must be a positive integer, got 0"),
    "negative-heads": ({"num_attention_heads": -2}, r"num_attention_heads must be a positive integer, got -2"),
    "hidden-as-string": ({"hidden_size": "16"}, r"hidden_size must be an integer, got '16' \(str\)"),
    "hidden-as-bool": ({"hidden_size": True}, r"hidden_size must be an integer, got True \(bool\)"),
    "heads-as-bool": ({"num_attention_heads": True}, r"num_attention_heads must be an integer, got True \(bool\)"),
    "layers-as-float": ({"num_hidden_layers": 2.5}, r"num_hidden_layers must be an integer, got 2.5 \(float\)"),
    "not-divisible": ({"hidden_size": 18, "num_attention_heads": 4}, r"hidden_size 18 is not divisible by num_atte"),
    "negative-layers": ({"num_hidden_layers": -1}, r"num_hidden_layers must be a positive integer, got -1"),
    "zero-vocab": ({"vocab_size": 0}, r"vocab_size must be a positive integer, got 0"),
    "zero-intermediate": ({"intermediate_size": 0}, r"intermediate_size must be a positive integer, got 0"),
    "negative-norm-eps": ({"norm_eps": -1}, r"norm_eps must be above 0, got -1"),
    "zero-norm-eps": ({"norm_eps": 0.0}, r"norm_eps must be above 0, got 0.0"),
    "nan-norm-eps": ({"norm_eps": math.nan}, r"norm_eps must be a finite number, got nan"),
    "infinite-theta": ({"global_rope_theta": math.inf}, r"global_rope_theta must be a finite number, got inf"),
    "negative-theta": ({"local_rope_theta": -10000.0}, r"local_rope_theta must be above 0, got -10000.0"),
    "v5-theta-nan": (
        {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": math.nan}}},
        r"global_rope_theta must be a finite number, got nan",
    ),
    "dropout-above-1": ({"attention_dropout": 1.5}, r"attention_dropout must be in \[0, 1\], got 1.5"),
    "dropout-below-0": ({"mlp_dropout": -0.1}, r"mlp_dropout must be in \[0, 1\], got -0.1"),
    "init-nan": ({"initializer_range": math.nan}, r"initializer_range must be a finite number, got nan"),
    "init-negative": ({"initializer_range": -0.02}, r"initializer_range must be 0 or above, got -0.02"),
    "cutoff-zero": ({"initializer_cutoff_factor": 0.0}, r"initializer_cutoff_factor must be above 0, got 0.0"),
    "bias-as-string": ({"norm_bias": "false"}, r"norm_bias must be true or false, got 'false' \(str\)"),
    "rope-factor-zero": (
        {"rope_scaling": {"rope_type": "linear", "factor": 0.0}},
        r"rope_parameters\['full_attention'\]: factor must be above 0, got 0.0",
    ),
    "rope-factor-nan": (
        {"rope_scaling": {"rope_type": "linear", "factor": math.nan}},
        r"rope_parameters\['full_attention'\]: factor must be a finite number, got nan",
    ),
    "rope-scaling-as-list": ({"rope_scaling": [4.0]}, r"rope_scaling must be a dict or null, got \[4.0\]"),
    "rope-entry-as-number": (
        {"rope_parameters": {"full_attention": 4.0}},
        r"rope_parameters\['full_attention'\] must be a dict, got 4.0",
    ),
    "labels-as-list": ({"id2label": ["neg", "pos"]}, r"id2label must be a dict, got \['neg', 'pos'\] \(list\)"),
}
NOT_AN_OBJECT = [([1, 2], "a list"), ("hello", "a string"), (3, "a number"), (None, "null")]
TOO_BIG = {  # a config whose weights cannot fit in memory -> the key the message names
    "a-million-layers": ({"num_hidden_layers": 1_000_000, "hidden_size": 768, "num_attention_heads": 12}, "num_hid"),
    "a-huge-vocabulary": ({"vocab_size": 10**12}, "vocab_size"),
    "a-huge-hidden-size": ({"hidden_size": 2**20, "num_attention_heads": 2**10}, "hidden_size"),
}
needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="the memory guard reads Linux's /proc")


def not_an_object_message(folder, shown):
    path = re.escape(str(folder / "config.json"))
    return rf"{path} holds {shown}, not a JSON object \{{\"key\": value, \.\.\.\}}: fix it, or fetch the"


def too_big_message(config):
    gigabytes = 4 * mb.parameter_count(config) / 1e9
    return rf"The weights alone would need about {gigabytes:,.1f} GB \(.*parameters in float32\), more than the"


@contextlib.contextmanager
def address_space_limit(extra_bytes):
    """At most `extra_bytes` more memory for this process while inside: should a refusal under test be lost, the test
    fails with a MemoryError instead of filling the machine's memory."""
    import resource

    with open("/proc/self/status") as f:
        used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (used + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


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
