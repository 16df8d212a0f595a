"""Hostile config.json files: each a one-line error naming the key, the value and what to do, from Python and from
load.py's command line; a config too big for memory is refused before a layer is built; every real config loads."""

import contextlib
import json
import math
import os
import re
import resource
import shutil
from pathlib import Path

import pytest
import torch

import load
import modernbert as mb

HERE = Path(__file__).resolve().parent
SHARED_DATA = Path(os.environ.get("MODERNBERT_SHARED_DATA", HERE.parent / "shared" / "data"))
TINY = dict(
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


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A whole checkpoint load.py runs: a tiny random model and a word-level tokenizer with [MASK] and [PAD]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    mb.ModernBertForMaskedLM(mb.ModernBertConfig(**TINY)).save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(WORDS[:5])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"mask_token": "[MASK]", "pad_token": "[PAD]"}))
    return folder


def with_config(tiny_folder, tmp_path, config):
    """A copy of the tiny checkpoint whose config.json holds `config` (a dict of changes, or any JSON value)."""
    folder = shutil.copytree(tiny_folder, tmp_path / "ckpt")
    good = json.loads((tiny_folder / "config.json").read_text())
    for v5 in ("layer_types", "rope_parameters"):  # the v4 spelling, so a change to a layer count or theta holds
        del good[v5]
    (folder / "config.json").write_text(json.dumps({**good, **config} if isinstance(config, dict) else config))
    return folder


def assert_one_line_cli_error(folder, capsys, message):
    """load.py on `folder`: exit status 2 and a single line `error: ...` that matches `message`."""
    capsys.readouterr()
    assert load.main(["--model", str(folder), "a [MASK] text ."]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err


def test_the_tiny_checkpoint_itself_loads_at_the_command_line(tiny_folder, tmp_path, capsys):
    """The control for the tests below: only the changes they write into config.json make load.py fail."""
    assert load.main(["--model", str(with_config(tiny_folder, tmp_path, {})), "--top-k", "2", "a [MASK] text ."]) == 0
    assert "[MASK] 1 of 1" in capsys.readouterr().out


HOSTILE = {  # what config.json says -> what the message must say (the key, the value, the kind wanted)
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


@pytest.mark.parametrize("change, message", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_config_is_one_line_naming_the_key_and_value(tiny_folder, tmp_path, capsys, change, message):
    folder = with_config(tiny_folder, tmp_path, change)
    for load_it in (mb.ModernBertConfig.from_pretrained, mb.ModernBertForMaskedLM.from_pretrained, load.load_model):
        with pytest.raises(ValueError, match=rf"^Invalid ModernBertConfig: .*{message}") as e:
            load_it(folder)
        assert "\n" not in str(e.value)
    assert_one_line_cli_error(folder, capsys, rf"^error: Invalid ModernBertConfig: .*{message}")
    with pytest.raises(ValueError, match=message):  # the same check for a config made in Python
        mb.ModernBertConfig.from_dict({**TINY, **change})


@pytest.mark.parametrize("value, shown", [([1, 2], "a list"), ("hello", "a string"), (3, "a number"), (None, "null")])
def test_a_config_json_that_is_not_an_object_is_named(tiny_folder, tmp_path, capsys, value, shown):
    folder = with_config(tiny_folder, tmp_path, value)
    path = re.escape(str(folder / "config.json"))
    message = rf"{path} holds {shown}, not a JSON object \{{\"key\": value, \.\.\.\}}: fix it, or fetch the"
    for load_it in (
        mb.ModernBertConfig.from_pretrained,
        mb.ModernBertForMaskedLM.from_pretrained,
        load.load_tokenizer,
    ):
        with pytest.raises(ValueError, match=f"^{message}"):
            load_it(folder)
    assert_one_line_cli_error(folder, capsys, f"^error: {message}")


@contextlib.contextmanager
def address_space_limit(extra_bytes):
    """At most `extra_bytes` more memory for this process while inside: should a refusal under test be lost, the test
    fails with a MemoryError instead of filling the machine's memory."""
    with open("/proc/self/status") as f:
        used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (used + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="the memory guard reads Linux's /proc")
@pytest.mark.parametrize(
    "change, keys",
    [
        ({"num_hidden_layers": 1_000_000, "hidden_size": 768, "num_attention_heads": 12}, "num_hidden_layers"),
        ({"vocab_size": 10**12}, "vocab_size"),
        ({"hidden_size": 2**20, "num_attention_heads": 2**10}, "hidden_size"),
    ],
    ids=["a-million-layers", "a-huge-vocabulary", "a-huge-hidden-size"],
)
def test_a_config_too_big_for_memory_is_refused_before_building(tiny_folder, tmp_path, capsys, change, keys):
    folder = with_config(tiny_folder, tmp_path, change)
    config = mb.ModernBertConfig.from_pretrained(folder)  # the config alone is fine: nothing is built
    gigabytes = 4 * mb.parameter_count(config) / 1e9
    message = rf"The weights alone would need about {gigabytes:,.1f} GB \(.*parameters in float32\), more than the"
    with address_space_limit(2 * 2**30):
        with pytest.raises(ValueError, match=f"^{message}.*{keys}"):
            mb.ModernBertForMaskedLM(config)
        with pytest.raises(ValueError, match=f"^{message}"):
            mb.ModernBertForMaskedLM.from_pretrained(folder)
        assert_one_line_cli_error(folder, capsys, f"^error: {message}.*{keys}")


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
    config = mb.ModernBertConfig(**{**TINY, **change})
    assert mb.parameter_count(config) == mb.ModernBertForMaskedLM(config).num_parameters()


def test_the_memory_check_compares_with_the_memory_available(monkeypatch):
    config = mb.ModernBertConfig(**TINY)
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
    paths = sorted(SHARED_DATA.glob("*/config.json")) + sorted((HERE / "fixtures").glob("*/config.json"))
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
def test_transformers_accepts_what_we_accept_among_the_real_configs():
    transformers = pytest.importorskip("transformers")
    for name, d in {**real_configs(), **RELEASED}.items():
        theirs = transformers.ModernBertConfig.from_dict(d)
        ours = mb.ModernBertConfig.from_dict(d)
        assert (ours.num_hidden_layers, ours.hidden_size, ours.norm_eps) == (
            theirs.num_hidden_layers,
            theirs.hidden_size,
            theirs.norm_eps,
        ), name


@pytest.mark.parametrize("token_id", [-1, 10**12, 10**30])
def test_a_special_token_id_no_token_has_is_not_read_as_one(tiny_folder, tmp_path, capsys, token_id):
    """config.json's bos_token_id names no token of this tokenizer: it names none, as an id past the vocabulary
    always did (the tokenizer used to overflow on these), and the checkpoint loads as transformers loads it."""
    folder = with_config(tiny_folder, tmp_path, {"bos_token_id": token_id})
    assert "bos_token" not in load.load_tokenizer(folder).special_tokens_map
    assert load.main(["--model", str(folder), "--top-k", "1", "a [MASK] text ."]) == 0
