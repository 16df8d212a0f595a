"""Tests of load.py, in the file's order: load_model and its report at the caller's line, the tokenizer against
the official ids and any checkpoint's special tokens, a save/load round trip through transformers, fill_mask
against transformers' fill-mask pipeline, the command line run as a user runs it (in a subprocess: marked slow;
hostile config.json files at it), and the recipes of docs/python.md and README. The checkpoints are small
random-weight ModernBERTs (conftest.py): one in the official format beside the real tokenizer files from
shared/data, one with an mmBERT-style tokenizer trained here, one with a word-level tokenizer. Their weights are
spread so that every layer matters and the top-k order is not rounding noise.
"""

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import modernbert as mb
from conftest import (
    HALF_FACTOR,
    HERE,
    HOSTILE_CONFIGS,
    MMBERT_IDS,
    MMBERT_TINY,
    NOT_AN_OBJECT,
    TEXTS,
    TINY,
    TOKENIZER_DIR,
    TOKENIZER_FILES,
    TOO_BIG,
    address_space_limit,
    errors,
    mmbert_style_tokenizer,
    needs_gpu,
    needs_proc,
    needs_tokenizer,
    needs_transformers,
    not_an_object_message,
    run_cli,
    spread_weights,
    too_big_message,
    transformers,
    with_config,
    within_official_error,
)
from load import fill_mask, load_model, load_tokenizer, save_with_tokenizer, shown, tokenize

MMBERT_TEXTS = ["The capital of France is <mask>.", "Plants create <mask> through a process known as <mask>."]


@pytest.fixture(scope="session")
def demo(demo_checkpoint):
    return load_model(demo_checkpoint), load_tokenizer(demo_checkpoint)


@pytest.fixture(scope="session")
def mmbert_checkpoint(tmp_path_factory):
    """An mmBERT-style masked LM: the tokenizer above, random spread weights, its ids in config.json."""
    folder = tmp_path_factory.mktemp("mmbert-style")
    vocab = mmbert_style_tokenizer(folder).get_vocab_size()
    torch.manual_seed(0)
    model = mb.ModernBertForMaskedLM(mb.ModernBertConfig(vocab_size=vocab, **MMBERT_TINY, **MMBERT_IDS))
    spread_weights(model).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------
# load_model: the task classes and dtype names; the loader's report points at the caller's line; what a hub id
# fetches


def test_load_model_builds_each_task_and_reads_dtype_names(demo_checkpoint):
    with pytest.warns(
        UserWarning, match=r"dropped \['decoder.bias'\]; initialised fresh \['classifier.weight', 'classifier.bias'\]"
    ):
        classifier = load_model(demo_checkpoint, task="sequence-classification", num_labels=3)
    assert isinstance(classifier, mb.ModernBertForSequenceClassification) and classifier.classifier.out_features == 3
    with pytest.warns(UserWarning, match="initialised fresh"):
        tagger = load_model(demo_checkpoint, task=mb.ModernBertForTokenClassification)
    assert isinstance(tagger, mb.ModernBertForTokenClassification)
    assert load_model(demo_checkpoint, dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown task"):
        load_model(demo_checkpoint, task="summarization")
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_model(demo_checkpoint, dtype="int8")


def test_the_loaders_warning_says_what_changed_at_the_callers_line(demo_checkpoint):
    """An encoder from a masked-LM folder: the warning names what was dropped (no "initialised fresh nothing")
    and points at the line that asked for the model, through every door, not at a line of our files."""
    from embed import load_embedder

    doors = {
        "from_pretrained": lambda: mb.ModernBertModel.from_pretrained(demo_checkpoint),
        "load_model": lambda: load_model(demo_checkpoint, task=mb.ModernBertModel),
        "load_embedder": lambda: load_embedder(demo_checkpoint),  # + the warning that it has no pooling files
    }
    for door, call in doors.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        (report,) = [w for w in caught if "ModernBertModel from" in str(w.message)]
        assert str(report.message).endswith(": dropped ['decoder.bias', 'head.dense.weight', 'head.norm.weight']."), (
            door,
            str(report.message),
        )
        assert {w.filename for w in caught} == {__file__}, (door, [(w.filename, w.lineno) for w in caught])
    with pytest.warns(UserWarning, match=r"dropped \['decoder.bias'\]; initialised fresh \['classifier.weight'"):
        load_model(demo_checkpoint, task="sequence-classification")


def test_hub_downloads_fetch_the_sentence_transformers_files():
    """A hub id is fetched by load.py with its HUB_FILES: the module files of embedders come too (without them
    a hub embedder would fall back to classifier_pooling), pickles and ONNX exports do not."""
    from huggingface_hub.utils import filter_repo_objects

    import load

    wanted = ["config.json", "model.safetensors", *TOKENIZER_FILES, "modules.json", "sentence_bert_config.json"]
    wanted += ["config_sentence_transformers.json", "1_Pooling/config.json", "2_Dense/config.json"]
    wanted += ["2_Dense/model.safetensors", "model.safetensors.index.json"]
    unwanted = ["README.md", "pytorch_model.bin", "2_Dense/pytorch_model.bin", "onnx/model.onnx"]
    assert sorted(filter_repo_objects(wanted + unwanted, allow_patterns=list(load.HUB_FILES))) == sorted(wanted)


@pytest.mark.parametrize("name", sorted(mb.DTYPES))
def test_every_door_reads_the_same_dtype_names(name, word_checkpoint):
    """from_pretrained, load_model and load.py's --dtype take the same names ("bf16" and "bfloat16" alike) and refuse
    the same ones."""
    import load

    assert mb.ModernBertForMaskedLM.from_pretrained(word_checkpoint, dtype=name).dtype == mb.DTYPES[name]
    assert load_model(word_checkpoint, dtype=name).dtype == mb.DTYPES[name]
    assert mb.parse_dtype(mb.DTYPES[name]) is mb.DTYPES[name] and mb.parse_dtype(None) is None
    for door in (mb.ModernBertForMaskedLM.from_pretrained, load_model):
        with pytest.raises(ValueError, match=r"Unknown dtype 'int8': pass a torch dtype"):
            door(word_checkpoint, dtype="int8")
    assert load.parse_args(["--dtype", name]).dtype == name


# ----------------------------------------------------------------------------------------------------
# load_tokenizer and tokenize: the official ids; special tokens from the checkpoint's own files


@needs_tokenizer
def test_tokenizer_gives_the_official_ids():
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    assert tokenizer.encode("Hello world").ids == [50281, 12092, 1533, 50282]
    assert tokenizer.encode("The capital of France is [MASK].").ids == [
        50281,
        510,
        5347,
        273,
        6181,
        310,
        50284,
        15,
        50282,
    ]
    assert tokenizer.encode(" is [MASK].", add_special_tokens=False).ids == [310, 50284, 15]
    # lstrip: [MASK] takes the space before it, so it costs no token of its own
    assert tokenizer.encode("is [MASK].").ids == tokenizer.encode("is[MASK].").ids
    assert [tokenizer.token_to_id(t) for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")] == [
        50280,
        50281,
        50282,
        50283,
        50284,
    ]


def test_special_tokens_come_from_the_checkpoint_files(tmp_path):
    """tokenizer_config.json first (plain strings), then special_tokens_map.json (AddedToken dicts), then
    config.json's ids; a folder naming no mask token is a clear error naming the files read."""
    from load import mask_token

    mmbert_style_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(MMBERT_IDS))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.special_tokens_map == dict(
        mask_token="<mask>",
        pad_token="<pad>",
        cls_token="<bos>",
        sep_token="<eos>",
        bos_token="<bos>",
        eos_token="<eos>",
    ) | {"unk_token": "<unk>"}
    assert tokenizer.padding["pad_token"] == "<pad>" and tokenizer.padding["pad_id"] == 0
    assert tokenizer.encode("a b").ids[0] == 2 and tokenizer.encode("a b").ids[-1] == 1  # <bos> ... <eos>

    mmbert_style_tokenizer(tmp_path, mask_in_config=False)  # the AddedToken dict of special_tokens_map.json
    assert mask_token(load_tokenizer(tmp_path)) == "<mask>"
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # only config.json's ids are left
        (tmp_path / name).write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.special_tokens_map == {"pad_token": "<pad>", "cls_token": "<bos>", "sep_token": "<eos>"} | {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
    }
    with pytest.raises(
        ValueError,
        match=r"^No mask token: tokenizer_config.json, special_tokens_map.json and config.json in '.*' name none",
    ):
        mask_token(tokenizer)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"mask_token": "[MASK]"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json in .* says mask_token is '\[MASK\]', but tokenizer"):
        load_tokenizer(tmp_path)


def test_a_file_that_is_not_json_is_named(demo_checkpoint, tmp_path, capsys):
    """A broken config.json (or tokenizer file) is an error naming the file, from Python and at the command line."""
    import load

    folder = shutil.copytree(demo_checkpoint, tmp_path / "broken")
    config = folder / "config.json"
    config.write_text('{\n  "hidden_size": 64,\n}\n')  # a trailing comma
    message = rf"{re.escape(str(config))} is not valid JSON \(Expecting property name .*\): fix it, or fetch the"
    with pytest.raises(ValueError, match=rf"^{message}"):
        mb.ModernBertForMaskedLM.from_pretrained(folder)
    with pytest.raises(ValueError, match=rf"^{message}"):
        load_tokenizer(folder)  # reads config.json's special token ids
    assert load.main(["--model", str(folder), "A [MASK]."]) == 2
    err = capsys.readouterr().err
    assert re.match(rf"^error: {message}", err) and len(err.splitlines()) == 1, err
    shutil.copyfile(demo_checkpoint / "config.json", config)
    index = folder / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "model.safetensors",}}')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(index))} is not valid JSON \(Expecting property name"):
        mb.ModernBertForMaskedLM.from_pretrained(folder)
    (folder / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match=rf"^Could not read {re.escape(str(folder / 'tokenizer.json'))} \(.+\)"):
        load_tokenizer(folder)


@needs_tokenizer
def test_tokenize_pads_the_batch_and_never_truncates():
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    batch = tokenize(tokenizer, ["Hello world", "The capital of France is [MASK]."])
    assert batch["input_ids"].tolist() == [
        [50281, 12092, 1533, 50282] + [50283] * 5,
        [50281, 510, 5347, 273, 6181, 310, 50284, 15, 50282],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 5, [1] * 9]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
    assert tokenize(tokenizer, ["Hello world", "a b c d e f g"], max_length=9)["input_ids"].shape == (
        2,
        9,
    )  # exactly at the limit
    with pytest.raises(ValueError, match=r"Text 2 is 9 tokens long, more than the model's limit of 8"):
        tokenize(tokenizer, ["Hello world", "a b c d e f g"], max_length=8)


@pytest.mark.parametrize("token_id", [-1, 10**12, 10**30])
def test_a_special_token_id_no_token_has_is_not_read_as_one(word_checkpoint, tmp_path, capsys, token_id):
    """config.json's bos_token_id names no token of this tokenizer: it names none, as an id past the vocabulary
    always did (the tokenizer used to overflow on these), and the checkpoint loads as transformers loads it."""
    import load

    folder = with_config(word_checkpoint, tmp_path, {"bos_token_id": token_id})
    assert "bos_token" not in load_tokenizer(folder).special_tokens_map
    assert load.main(["--model", str(folder), "--top-k", "1", "a [MASK] text ."]) == 0


# ----------------------------------------------------------------------------------------------------
# save_with_tokenizer: a folder transformers reads


def test_save_with_tokenizer_writes_a_folder_transformers_reads_with_the_same_logits(demo_checkpoint, demo, tmp_path):
    """Ours saves a folder that transformers opens (model and tokenizer) and computes the same logits from."""
    transformers = pytest.importorskip("transformers")
    model, tokenizer = demo
    save_with_tokenizer(model, tmp_path, demo_checkpoint)
    theirs = transformers.ModernBertForMaskedLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert (
        transformers.AutoTokenizer.from_pretrained(tmp_path)(TEXTS[0])["input_ids"] == tokenizer.encode(TEXTS[0]).ids
    )
    batch = tokenize(load_tokenizer(tmp_path), TEXTS)  # ragged: the padding is exercised
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        a, b = model(**batch).logits[real], theirs(**batch).logits[real]  # padded positions are undefined
    diff = (a - b).abs()
    worst = int(diff.max(1).values.argmax())
    assert diff.max() < 1e-4, f"logits differ: max {diff.max():.2e}, mean {diff.mean():.2e}, at real token {worst}"


# ----------------------------------------------------------------------------------------------------
# fill_mask against transformers' fill-mask pipeline


def test_fill_mask_matches_the_transformers_pipeline(demo_checkpoint, demo):
    transformers = pytest.importorskip("transformers")
    model, tokenizer = demo
    official = transformers.pipeline(
        "fill-mask",
        model=transformers.ModernBertForMaskedLM.from_pretrained(demo_checkpoint, attn_implementation="sdpa").eval(),
        tokenizer=transformers.AutoTokenizer.from_pretrained(demo_checkpoint),
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


def test_fill_mask_on_an_mmbert_style_tokenizer_matches_the_pipeline(mmbert_checkpoint):
    transformers = pytest.importorskip("transformers")
    official = transformers.pipeline(
        "fill-mask",
        model=transformers.ModernBertForMaskedLM.from_pretrained(mmbert_checkpoint, attn_implementation="sdpa").eval(),
        tokenizer=transformers.AutoTokenizer.from_pretrained(mmbert_checkpoint),
    )
    tokenizer = load_tokenizer(mmbert_checkpoint)
    assert [tokenizer.encode(t).ids for t in MMBERT_TEXTS] == [
        official.tokenizer(t)["input_ids"] for t in MMBERT_TEXTS
    ]
    ours = fill_mask(load_model(mmbert_checkpoint), tokenizer, MMBERT_TEXTS, top_k=4)
    for text, mine in zip(MMBERT_TEXTS, ours):
        theirs = official(text, top_k=4)
        theirs = [theirs] if isinstance(theirs[0], dict) else theirs
        assert len(mine) == len(theirs) == text.count("<mask>")
        for a, b in zip(mine, theirs):
            assert [(p["token"], p["token_str"], p["sequence"]) for p in a] == [
                (p["token"], p["token_str"], p["sequence"]) for p in b
            ], text
            assert max(abs(p["score"] - q["score"]) for p, q in zip(a, b)) < 1e-5, text


def test_fill_mask_takes_a_single_string_and_rejects_bad_input(demo):
    model, tokenizer = demo
    (only_mask,) = fill_mask(model, tokenizer, "The capital of France is [MASK].", top_k=2)
    assert (
        len(only_mask) == 1 and [sorted(p) for p in only_mask[0]] == [["score", "sequence", "token", "token_str"]] * 2
    )
    with pytest.raises(ValueError, match=r"Text 2 has no \[MASK\]"):
        fill_mask(model, tokenizer, ["a [MASK]", "no mask"])
    with pytest.raises(ValueError, match="more than the model's limit of 512"):
        fill_mask(model, tokenizer, ["word " * 600 + "[MASK]"])


@pytest.mark.gpu
@needs_gpu
@needs_transformers
@pytest.mark.parametrize("impl", [None, "sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fill_mask_on_gpu_is_as_exact_as_the_official_pipeline(demo_checkpoint, dtype, impl):
    """42 masks in 40 texts. The logits at every mask over the whole vocabulary (what the pipeline turns into
    scores): max and mean error within 1.25x of the official's. The scores of the fp32 pipeline's top 10
    tokens: mean error within 1.25x. Their max is one mask's luck: on an H100 in bf16 ours was 0.102 against
    the official 0.057, on one mask whose top token has p = 0.70, while our logits there were the closer
    ones (max error 0.59 against 0.66, mean 0.076 against 0.081)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_checkpoint)

    def official(dtype):
        model = transformers.ModernBertForMaskedLM.from_pretrained(
            demo_checkpoint, attn_implementation="sdpa", dtype=dtype
        )
        return transformers.pipeline("fill-mask", model=model.eval(), tokenizer=tokenizer, device=0)

    def scores(results):  # {(text, mask, token): score}
        results = [[r] if isinstance(r[0], dict) else r for r in results]  # the pipeline unwraps a single mask
        return {
            (t, m, p["token"]): p["score"] for t, masks in enumerate(results) for m, ps in enumerate(masks) for p in ps
        }

    def logits_at_masks(forward):  # (masks, vocab), text by text, left to right
        with torch.no_grad():
            out = [forward(tokenizer(text, return_tensors="pt").to("cuda")) for text in texts]
        return torch.cat([logits[0][ids["input_ids"][0] == tokenizer.mask_token_id].float() for logits, ids in out])

    g = torch.Generator().manual_seed(0)
    words = " ".join(TEXTS).replace("[MASK]", "").split()
    texts = TEXTS + [
        " ".join(words[i] for i in torch.randint(len(words), (int(n),), generator=g))
        for n in torch.randint(3, 60, (36,), generator=g)
    ]
    texts = TEXTS + [" ".join(t.split()[: i + 1] + ["[MASK]"] + t.split()[i + 1 :]) for i, t in enumerate(texts[4:])]
    truth_pipe, their_pipe = official(torch.float32), official(dtype)
    ours = load_model(demo_checkpoint, device="cuda", dtype=dtype, attn_implementation=impl)
    forward = lambda m: lambda b: (m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b)  # noqa: E731
    truth, theirs, mine = (logits_at_masks(forward(m)) for m in (truth_pipe.model, their_pipe.model, ours))
    within_official_error(mine, theirs, truth, f"logits at the masks, {dtype} {impl}")
    truth = scores([truth_pipe(text, top_k=10) for text in texts])
    theirs = scores([their_pipe(text, top_k=1000) for text in texts])
    mine = scores(fill_mask(ours, load_tokenizer(demo_checkpoint), texts, top_k=1000))
    keys = sorted(truth)
    (_, our_mean), (_, their_mean) = (
        errors(torch.tensor([s[k] for k in keys]), torch.tensor([truth[k] for k in keys])) for s in (mine, theirs)
    )
    assert our_mean <= HALF_FACTOR * their_mean, (
        f"fill-mask scores {dtype} {impl}: mean error {our_mean:.3g}, official {their_mean:.3g}"
    )


# ----------------------------------------------------------------------------------------------------
# The command line: `python load.py`, one-line errors with exit status 2


PREDICTION = re.compile(
    r"^    (\d\.\d{4})  (.+?) +\(id +(\d+)\)  (.+)$"
)  # score, token (no leading space), id, sequence


def assert_one_line_cli_error(folder, capsys, message):
    """load.py on `folder`: exit status 2 and a single line `error: ...` that matches `message`."""
    import load

    capsys.readouterr()
    assert load.main(["--model", str(folder), "a [MASK] text ."]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err


def test_the_word_level_checkpoint_itself_loads_at_the_command_line(word_checkpoint, tmp_path, capsys):
    """The control for the tests below: only the changes they write into config.json make load.py fail."""
    import load

    folder = with_config(word_checkpoint, tmp_path, {})
    assert load.main(["--model", str(folder), "--top-k", "2", "a [MASK] text ."]) == 0
    assert "[MASK] 1 of 1" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", HOSTILE_CONFIGS.values(), ids=HOSTILE_CONFIGS.keys())
def test_a_hostile_config_is_one_line_at_every_door(word_checkpoint, tmp_path, capsys, change, message):
    """load_model and `python load.py` say what modernbert.py says (test_modernbert.py): one line naming the key,
    the value and the kind wanted."""
    folder = with_config(word_checkpoint, tmp_path, change)
    with pytest.raises(ValueError, match=rf"^Invalid ModernBertConfig: .*{message}") as e:
        load_model(folder)
    assert "\n" not in str(e.value)
    assert_one_line_cli_error(folder, capsys, rf"^error: Invalid ModernBertConfig: .*{message}")


@pytest.mark.parametrize("value, shown", NOT_AN_OBJECT)
def test_a_config_json_that_is_not_an_object_is_named(word_checkpoint, tmp_path, capsys, value, shown):
    folder = with_config(word_checkpoint, tmp_path, value)
    message = not_an_object_message(folder, shown)
    for load_it in (load_model, load_tokenizer):
        with pytest.raises(ValueError, match=f"^{message}"):
            load_it(folder)
    assert_one_line_cli_error(folder, capsys, f"^error: {message}")


@needs_proc
@pytest.mark.parametrize("change, key", TOO_BIG.values(), ids=TOO_BIG.keys())
def test_a_config_too_big_for_memory_is_one_line_at_the_command_line(word_checkpoint, tmp_path, capsys, change, key):
    folder = with_config(word_checkpoint, tmp_path, change)
    message = too_big_message(mb.ModernBertConfig.from_pretrained(folder))
    with address_space_limit(2 * 2**30):
        assert_one_line_cli_error(folder, capsys, f"^error: {message}.*{key}")


@pytest.mark.slow
def test_cli_prints_top_k_for_every_mask_of_every_text(demo_checkpoint, demo):
    """Short texts fit the window around each mask: each line shows fill_mask's `sequence`, without the
    [CLS] / [SEP] that the pipeline keeps in it when a text has several masks."""
    texts = TEXTS[:2]
    rc, out, err, _ = run_cli("--model", demo_checkpoint, "--top-k", 3, *texts)
    assert rc == 0, err
    expected = fill_mask(*demo, texts, top_k=3)
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
                assert (float(score), token_str, int(token), sequence) == (
                    round(p["score"], 4),
                    shown(p["token_str"], strip=True),
                    p["token"],
                    shown(p["sequence"].removeprefix("[CLS]").removesuffix("[SEP]")),
                ), line
    assert next(lines, None) is None


def test_cli_shows_each_prediction_among_its_neighbours(demo_checkpoint, demo, capsys):
    """A long text: each prediction line shows the filled token among 10 tokens on either side, "..." where the
    text goes on, and the text itself only by its beginning (the pipeline's `sequence` is the whole text)."""
    import load

    text = "word " * 200 + "a [MASK] here" + " more words" * 100  # 504 tokens with [CLS] and [SEP]
    assert load.main(["--model", str(demo_checkpoint), "--top-k", "2", text]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [text[:80] + f"... ({len(text):,} characters)", "  [MASK] 1 of 1:"] and len(lines) == 4
    for line, p in zip(lines[2:], fill_mask(*demo, text, top_k=2)[0][0]):
        context = PREDICTION.match(line).group(4)
        assert context == "..." + " word" * 9 + f" a{p['token_str']} here" + " more words" * 4 + " more...", line


@pytest.mark.slow
def test_cli_fill_mask_on_an_mmbert_style_folder(mmbert_checkpoint, capsys):
    """`load.py --model FOLDER "... <mask> ..."` end to end (in a subprocess); in-process, the demo text takes the
    model's mask token, and a text with another model's spelling is a one-line error."""
    import load

    rc, out, err, _ = run_cli("--model", mmbert_checkpoint, "--top-k", 2, MMBERT_TEXTS[1])
    assert rc == 0, err
    model, tokenizer = load_model(mmbert_checkpoint), load_tokenizer(mmbert_checkpoint)
    expected = fill_mask(model, tokenizer, MMBERT_TEXTS[1], top_k=2)[0]
    lines = out.splitlines()
    assert lines[0] == MMBERT_TEXTS[1] and lines[1] == "  <mask> 1 of 2:" and lines[4] == "  <mask> 2 of 2:"
    predicted = [int(PREDICTION.match(line).group(3)) for line in lines[2:4] + lines[5:7]]
    assert predicted == [p["token"] for mask in expected for p in mask]
    assert load.main(["--model", str(mmbert_checkpoint), "--top-k", "1"]) == 0
    assert capsys.readouterr().out.startswith("Plants create <mask> through a process known as photosynthesis.\n")
    assert load.main(["--model", str(mmbert_checkpoint), "The capital of France is [MASK]."]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: Text 1 has no <mask> to fill: 'The capital of France is [MASK].'\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    "text, message",
    [
        ("A sentence without a mask.", r"^error: Text 2 has no \[MASK\] to fill: 'A sentence without a mask.'$"),
        (
            "word " * 600 + "[MASK]",
            r"^error: Text 2 is 603 tokens long, more than the model's limit of 512 \(max_position_embeddings\)",
        ),
    ],
    ids=["no-mask", "too-long"],
)
def test_cli_bad_text_is_one_line_and_exit_2(demo_checkpoint, text, message):
    rc, out, err, _ = run_cli("--model", demo_checkpoint, "Fine [MASK].", text)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and re.match(message, err), err


@pytest.mark.slow
def test_cli_finds_a_missing_tokenizer_before_loading_the_weights(tmp_path):
    """config.json and no weights, no tokenizer: the message is about the tokenizer, so the cheap check
    ran first (loading the weights first would have failed on the missing model.safetensors)."""
    (tmp_path / "config.json").write_text(json.dumps(mb.ModernBertConfig(**TINY).to_dict()))
    rc, out, err, _ = run_cli("--model", tmp_path, "A [MASK].")
    assert rc == 2 and out == "" and err.startswith(f"error: No tokenizer.json in '{tmp_path}'"), err


def test_a_checkpoint_file_given_for_its_folder_names_the_folder(demo_checkpoint, capsys):
    import load

    weights = demo_checkpoint / "model.safetensors"
    message = f"{str(weights)!r} is a file: pass the checkpoint's folder, {str(demo_checkpoint)!r}."
    with pytest.raises(NotADirectoryError) as e:
        mb.ModernBertForMaskedLM.from_pretrained(weights)
    assert str(e.value) == message
    assert load.main(["--model", str(weights), "A [MASK]."]) == 2 and capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nobody/no-such-modernbert", "my-checkpoint"], ids=["hub-id", "mistyped-folder"])
@pytest.mark.parametrize(
    "env",
    [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}],
    ids=["offline", "refused"],
)
def test_cli_unreachable_hub_is_a_clear_message(tmp_path, env, name):
    """An empty HF cache and no hub (offline mode, or a hub address that refuses connections): the message
    says both that there is no such folder (where it looked) and that the hub could not be asked."""
    rc, out, err, seconds = run_cli("--model", name, "A [MASK].", env={"HF_HOME": str(tmp_path), **env})
    assert rc == 2 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert (
        f"Could not get '{name}': no such folder here ({os.path.join(HERE, name)}), and as a hub id the local "
        "cache does not have it and the Hugging Face hub could not be reached"
        in err
        and "pass its folder" in err
    ), err
    assert seconds < 60, f"took {seconds:.0f} s to give up"


def test_load_py_sends_embed_and_rerank_to_embed_py(capsys):
    """load.py never imports embed.py (embed.py builds on it), and its old embed / rerank commands are a
    one-line error naming the new one."""
    import ast

    import load

    tree = ast.parse(Path(HERE, "load.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"embed", "importlib"} and "__import__" not in Path(HERE, "load.py").read_text()
    for command in ("embed", "rerank"):
        assert load.main([command, "--model", "m", "a text"]) == 2
        out, err = capsys.readouterr()
        assert (
            out == ""
            and err == f"error: `load.py {command}` is now `python embed.py {command}`, with the same arguments.\n"
        )


@pytest.mark.hub
def test_demo_on_the_real_checkpoint_fills_in_paris(hub):
    rc, out, err, _ = run_cli(
        "--top-k",
        3,
        "Plants create [MASK] through a process known as photosynthesis.",
        "The capital of France is [MASK].",
        env={"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")},
    )
    assert rc == 0, err
    france = out.split("The capital of France is [MASK].\n")[1].splitlines()
    score, token_str, token, sequence = PREDICTION.match(france[1]).groups()
    assert (token_str, sequence) == ("Paris", "The capital of France is Paris."), out


# ----------------------------------------------------------------------------------------------------
# docs/python.md's offline tiny checkpoint and the hub snippets of README and docs/python.md, run as written


@needs_tokenizer
def test_docs_tiny_checkpoint_recipe_prints_the_demo(tmp_path, monkeypatch, capsys):
    """docs/python.md's tiny checkpoint (random weights beside the real tokenizer), made as written, then its
    `python load.py` command: the demo text, its one mask, the top 3 in place. (test_docs.py runs the two blocks as
    printed and checks only their exit status.)"""
    import load

    page = Path(HERE, "docs", "python.md").read_text()
    section = page.split("## Fill-mask on the command line")[1].split("\n## ")[0]
    recipe = next(s for s in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "save_with_tokenizer" in s)
    command = next(s for s in re.findall(r"```bash\n(.*?)```", section, flags=re.S) if "tiny-modernbert" in s)
    monkeypatch.chdir(tmp_path)
    exec(recipe.replace('"../shared/data/modernbert-base"', repr(str(TOKENIZER_DIR))), {})
    (argv,) = [line.split()[2:] for line in command.splitlines() if line.startswith("python load.py")]
    assert load.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["Plants create [MASK] through a process known as photosynthesis.", "  [MASK] 1 of 1:"], lines
    assert len(lines) == 5 and all(
        PREDICTION.match(line).group(4).endswith(" through a process known as photosynthesis.") for line in lines[2:]
    ), lines


def test_docs_python_recipes(demo_checkpoint, tmp_path, monkeypatch):
    """README's and docs/python.md's hub snippets (loading, fill-mask and encoding; fine-tuning a classifier), run as
    written with the small demo checkpoint in place of the hub id. The loader's warnings point at the snippets'
    own lines."""
    readme = Path(HERE, "README.md").read_text().split("## Using it from Python")[1].split("\n## ")[0]
    page = Path(HERE, "docs", "python.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", readme + page, flags=re.S)
    snippets = [s for s in snippets if '"answerdotai/ModernBERT-base"' in s]
    assert len(snippets) == 3, "README's loading; docs/python.md's loading, fill-mask and encoding; fine-tuning"
    monkeypatch.chdir(tmp_path)
    namespace = {"data": [(["I loved it", "I hated it"], torch.tensor([1, 0]))] * 2}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for snippet in snippets:
            exec(snippet.replace('"answerdotai/ModernBERT-base"', repr(str(demo_checkpoint))), namespace)
    assert namespace["hidden"].shape == (*namespace["batch"]["input_ids"].shape, TINY["hidden_size"])
    assert (tmp_path / "my-classifier" / "model.safetensors").is_file()
    assert {w.filename for w in caught} == {"<string>"}, [(w.filename, str(w.message)) for w in caught]
