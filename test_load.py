"""Tests for load.py: the tokenizer against the official ids, fill_mask against transformers' fill-mask
pipeline, a save/load round trip through transformers, and the command line run as a user runs it.

The checkpoint is a small random-weight ModernBERT in the official format, built with transformers
(with modernbert.py where transformers is not installed) next to the real tokenizer files from
shared/data. Its weights are re-initialised so that every layer matters and the top-k order is not
rounding noise. Tests that use transformers only as the oracle skip without it.

    pytest test_load.py              # offline, well under a minute
    pytest test_load.py -m hub       # also the real answerdotai/ModernBERT-base (or MODERNBERT_HUB=1)
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import modernbert
from load import fill_mask, load_model, load_tokenizer, save_with_tokenizer, shown, tokenize

HERE = Path(__file__).parent
SHARED_DATA = Path(os.environ.get("MODERNBERT_SHARED_DATA", HERE.parent / "shared" / "data"))
TOKENIZER_DIR = SHARED_DATA / "modernbert-base"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
needs_tokenizer = pytest.mark.skipif(not (TOKENIZER_DIR / "tokenizer.json").is_file(), reason=f"the real tokenizer files are not in {TOKENIZER_DIR} (set MODERNBERT_SHARED_DATA)")

# local_attention=16 is a +-8 window, so the longer texts below cross it.
TINY = dict(vocab_size=50368, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, local_attention=16, max_position_embeddings=512)
TEXTS = [
    "The capital of France is [MASK].",
    "Plants create [MASK] through a process known as [MASK].",
    "A longer sentence, with [MASK] near the start and more words after it, so that the local window of the small test model is crossed on the way to the [MASK] at the end.",
    "[MASK]",
]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A folder holding config.json + model.safetensors (tiny, random) + the real tokenizer files."""
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(f"the real tokenizer files are not in {TOKENIZER_DIR} (set MODERNBERT_SHARED_DATA)")
    folder = tmp_path_factory.mktemp("tiny-modernbert")
    torch.manual_seed(0)
    try:
        import transformers

        model = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**TINY, attn_implementation="sdpa"))
    except ImportError:
        model = modernbert.ModernBertForMaskedLM(modernbert.ModernBertConfig(**TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name == "decoder.bias":
                p.normal_(0.0, 3.0)  # a wide spread: top-k neighbours are far apart, not rounding noise
            elif "tok_embeddings" in name:
                p.normal_(0.0, 1.0)  # tied to the decoder: logits ~ N(0, 8) from the hidden state, so the text matters
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)  # (out, in) matrices, std 1/sqrt(fan_in)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def ours(checkpoint):
    return load_model(checkpoint), load_tokenizer(checkpoint)


def run_cli(*args, env=None):
    """`python load.py ARGS` in a subprocess, as a user runs it: (returncode, stdout, stderr, seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    start = time.perf_counter()
    p = subprocess.run([sys.executable, str(HERE / "load.py"), *map(str, args)], capture_output=True, text=True, env=env, timeout=120, cwd=HERE)
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------
# Tokenizer


@needs_tokenizer
def test_tokenizer_gives_the_official_ids():
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    assert tokenizer.encode("Hello world").ids == [50281, 12092, 1533, 50282]
    assert tokenizer.encode("The capital of France is [MASK].").ids == [50281, 510, 5347, 273, 6181, 310, 50284, 15, 50282]
    assert tokenizer.encode(" is [MASK].", add_special_tokens=False).ids == [310, 50284, 15]
    # lstrip: [MASK] takes the space before it, so it costs no token of its own
    assert tokenizer.encode("is [MASK].").ids == tokenizer.encode("is[MASK].").ids
    assert [tokenizer.token_to_id(t) for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")] == [50280, 50281, 50282, 50283, 50284]


@needs_tokenizer
def test_tokenize_pads_the_batch_and_never_truncates():
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    batch = tokenize(tokenizer, ["Hello world", "The capital of France is [MASK]."])
    assert batch["input_ids"].tolist() == [[50281, 12092, 1533, 50282] + [50283] * 5, [50281, 510, 5347, 273, 6181, 310, 50284, 15, 50282]]
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 5, [1] * 9]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
    assert tokenize(tokenizer, ["Hello world", "a b c d e f g"], max_length=9)["input_ids"].shape == (2, 9)  # exactly at the limit
    with pytest.raises(ValueError, match=r"Text 2 is 9 tokens long, more than the model's limit of 8"):
        tokenize(tokenizer, ["Hello world", "a b c d e f g"], max_length=8)


# ----------------------------------------------------------------------------------------------------
# fill_mask against the official pipeline


def test_fill_mask_matches_the_transformers_pipeline(checkpoint, ours):
    transformers = pytest.importorskip("transformers")
    model, tokenizer = ours
    official = transformers.pipeline(
        "fill-mask",
        model=transformers.ModernBertForMaskedLM.from_pretrained(checkpoint, attn_implementation="sdpa").eval(),
        tokenizer=transformers.AutoTokenizer.from_pretrained(checkpoint),
    )
    ours_out = fill_mask(model, tokenizer, TEXTS, top_k=5)  # one padded batch
    top1 = set()
    for text, mine in zip(TEXTS, ours_out):
        theirs = official(text, top_k=5)  # one text at a time, unpadded
        theirs = [theirs] if isinstance(theirs[0], dict) else theirs  # the pipeline unwraps a single mask
        assert len(mine) == len(theirs) == text.count("[MASK]")
        for m, (a, b) in enumerate(zip(mine, theirs)):
            where = f"text {text!r}, mask {m + 1}"
            assert [p["token"] for p in a] == [p["token"] for p in b], where
            diff = max(abs(p["score"] - q["score"]) for p, q in zip(a, b))
            assert diff < 1e-5, f"{where}: scores differ by up to {diff:.2e}"
            assert [(p["token_str"], p["sequence"]) for p in a] == [(p["token_str"], p["sequence"]) for p in b], where
            top1.add(a[0]["token"])
    assert len(top1) >= 3, "the test model predicts the same top token everywhere: it would not catch a wrong row"


def test_fill_mask_takes_a_single_string_and_rejects_bad_input(ours):
    model, tokenizer = ours
    (only_mask,) = fill_mask(model, tokenizer, "The capital of France is [MASK].", top_k=2)
    assert len(only_mask) == 1 and [sorted(p) for p in only_mask[0]] == [["score", "sequence", "token", "token_str"]] * 2
    with pytest.raises(ValueError, match=r"Text 2 has no \[MASK\]"):
        fill_mask(model, tokenizer, ["a [MASK]", "no mask"])
    with pytest.raises(ValueError, match="more than the model's limit of 512"):
        fill_mask(model, tokenizer, ["word " * 600 + "[MASK]"])


# ----------------------------------------------------------------------------------------------------
# Loading and saving


def test_round_trip_through_transformers(checkpoint, ours, tmp_path):
    """Ours saves a folder that transformers opens (model and tokenizer) and computes the same logits from."""
    transformers = pytest.importorskip("transformers")
    model, tokenizer = ours
    save_with_tokenizer(model, tmp_path, checkpoint)
    theirs = transformers.ModernBertForMaskedLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)(TEXTS[0])["input_ids"] == tokenizer.encode(TEXTS[0]).ids
    batch = tokenize(load_tokenizer(tmp_path), TEXTS)  # ragged: the padding is exercised
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        a, b = model(**batch).logits[real], theirs(**batch).logits[real]  # padded positions are undefined
    diff = (a - b).abs()
    assert diff.max() < 1e-4, f"logits differ: max {diff.max():.2e}, mean {diff.mean():.2e}, at real token {int(diff.max(1).values.argmax())}"


def test_load_model_tasks_and_dtypes(checkpoint):
    with pytest.warns(UserWarning, match=r"dropped \['decoder.bias'\]; initialised fresh \['classifier.weight', 'classifier.bias'\]"):
        classifier = load_model(checkpoint, task="sequence-classification", num_labels=3)
    assert isinstance(classifier, modernbert.ModernBertForSequenceClassification) and classifier.classifier.out_features == 3
    with pytest.warns(UserWarning, match="initialised fresh"):
        tagger = load_model(checkpoint, task=modernbert.ModernBertForTokenClassification)
    assert isinstance(tagger, modernbert.ModernBertForTokenClassification)
    assert load_model(checkpoint, dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown task"):
        load_model(checkpoint, task="summarization")
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_model(checkpoint, dtype="int8")


# ----------------------------------------------------------------------------------------------------
# The command line, in a subprocess

PREDICTION = re.compile(r"^    (\d\.\d{4})  (.+?) +\(id +(\d+)\)  (.+)$")  # score, token (no leading space), id, sequence


def test_cli_prints_top_k_for_every_mask_of_every_text(checkpoint, ours):
    texts = TEXTS[:2]
    rc, out, err, _ = run_cli("--model", checkpoint, "--top-k", 3, *texts)
    assert rc == 0, err
    expected = fill_mask(*ours, texts, top_k=3)
    lines = iter(out.splitlines())
    for t, (text, masks) in enumerate(zip(texts, expected)):
        if t:
            assert next(lines) == ""
        assert next(lines) == text
        for m, predictions in enumerate(masks):
            assert next(lines) == f"  [MASK] {m + 1} of {len(masks)}:"
            for p in predictions:
                line = next(lines)
                score, token_str, token, sequence = PREDICTION.match(line).groups()
                assert (float(score), token_str, int(token), sequence) == (round(p["score"], 4), shown(p["token_str"], strip=True), p["token"], shown(p["sequence"])), line
    assert next(lines, None) is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("A sentence without a mask.", r"^error: Text 2 has no \[MASK\] to fill: 'A sentence without a mask.'$"),
        ("word " * 600 + "[MASK]", r"^error: Text 2 is 603 tokens long, more than the model's limit of 512 \(max_position_embeddings\)"),
    ],
    ids=["no-mask", "too-long"],
)
def test_cli_bad_text_is_one_line_and_exit_2(checkpoint, text, message):
    rc, out, err, _ = run_cli("--model", checkpoint, "Fine [MASK].", text)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and re.match(message, err), err


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}], ids=["offline", "refused"])
def test_cli_unreachable_hub_is_a_clear_message(tmp_path, env):
    """An empty HF cache and no hub (offline mode, or a hub address that refuses connections)."""
    rc, out, err, seconds = run_cli("--model", "nobody/no-such-modernbert", "A [MASK].", env={"HF_HOME": str(tmp_path), **env})
    assert rc == 2 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Could not get 'nobody/no-such-modernbert': the Hugging Face hub could not be reached" in err and "--model /path/to/folder" in err, err
    assert seconds < 60, f"took {seconds:.0f} s to give up"


# ----------------------------------------------------------------------------------------------------
# The real model: needs the hub (pytest -m hub, or MODERNBERT_HUB=1)


@pytest.fixture
def hub(request):
    wanted = os.environ.get("MODERNBERT_HUB") == "1" or re.search(r"(?<!not )\bhub\b", request.config.getoption("markexpr") or "")
    if not wanted:
        pytest.skip("downloads answerdotai/ModernBERT-base (~600 MB): run with `pytest -m hub` or MODERNBERT_HUB=1")


@pytest.mark.hub
def test_real_model_demo(hub):
    rc, out, err, _ = run_cli("--top-k", 3, "Plants create [MASK] through a process known as photosynthesis.", "The capital of France is [MASK].", env={"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")})
    assert rc == 0, err
    france = out.split("The capital of France is [MASK].\n")[1].splitlines()
    score, token_str, token, sequence = PREDICTION.match(france[1]).groups()
    assert (token_str, sequence) == ("Paris", "The capital of France is Paris."), out


# ----------------------------------------------------------------------------------------------------
# GPU: half precision and the automatic kernel choice agree with fp32 on the CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fill_mask_on_gpu(checkpoint, ours, dtype):
    model, tokenizer = ours
    gpu = load_model(checkpoint, device="cuda", dtype=dtype)
    for a, b in zip(fill_mask(model, tokenizer, TEXTS), fill_mask(gpu, tokenizer, TEXTS)):
        for p, q in zip(a, b):
            assert p[0]["token"] == q[0]["token"] and abs(p[0]["score"] - q[0]["score"]) < 0.03
