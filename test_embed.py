"""Tests of embed.py, in the file's order: sentence embeddings and rerankers against Sentence Transformers itself
(the oracle), on folders it saves (its version 6 format) and on folders written by hand as the hub's older
checkpoints have them (which it must read too), with the mmBERT-style tokenizer (conftest.py) and small random
ModernBERTs; fp32, to 1e-5. Then ColBERT against PyLate's golden files, the command line, and the snippets of
docs/embeddings.md and README. Each test that builds a SentenceTransformer or a CrossEncoder is marked slow
(importing sentence_transformers alone takes seconds).
"""

import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy
import pytest
import torch
from safetensors.torch import load_file

import embed
import modernbert as mb
from conftest import (
    HAS_TOKENIZER,
    HERE,
    MMBERT_IDS,
    MMBERT_TINY,
    NO_TOKENIZER,
    TOKENIZER_DIR,
    assert_close,
    mmbert_style_tokenizer,
    needs_tokenizer,
    run_cli,
    spread_weights,
)

HAS_SENTENCE_TRANSFORMERS = importlib.util.find_spec("sentence_transformers") is not None
needs_sentence_transformers = pytest.mark.skipif(
    not HAS_SENTENCE_TRANSFORMERS,
    reason="sentence-transformers (the oracle for embeddings and rerankers) is not installed",
)


EMBED_TEXTS = [
    "The capital of France is Paris.",
    "What is ModernBERT?",
    "",
    "a",
    "Plants create energy through a process known as photosynthesis, on the Seine and in many languages.",  # > 24
    "Hello world, the weather is lovely today. " * 4,  # far over max_seq_length
    "ABC xyz 0123456789",
]


PROMPTS = {"query": "search_query: ", "document": "search_document: "}


MAX_SEQ_LENGTH = 24  # the texts above cross it: this path truncates as sentence-transformers does


EMBED_TOL = 1e-5


@pytest.fixture(scope="session")
def embed_backbone(tmp_path_factory):
    """A bare ModernBertModel (random spread weights) with the mmBERT-style tokenizer: what an embedding
    checkpoint's root folder holds besides Sentence Transformers' files."""
    folder = tmp_path_factory.mktemp("embed-backbone")
    vocab = mmbert_style_tokenizer(folder).get_vocab_size()
    torch.manual_seed(1)
    config = mb.ModernBertConfig(vocab_size=vocab, **MMBERT_TINY, **MMBERT_IDS, classifier_pooling="mean")
    spread_weights(mb.ModernBertModel(config)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def st_transformer(embed_backbone):
    """sentence-transformers' Transformer module on the backbone, built once."""
    if not HAS_SENTENCE_TRANSFORMERS:
        pytest.skip("sentence-transformers (the oracle for embeddings and rerankers) is not installed")
    from sentence_transformers.sentence_transformer.modules import Transformer

    transformer = Transformer(str(embed_backbone))
    transformer.max_seq_length = MAX_SEQ_LENGTH
    return transformer


def spread_dense(dense):
    with torch.no_grad():
        dense.linear.weight.normal_(0.0, dense.linear.in_features**-0.5)
        dense.linear.bias.normal_(0.0, 0.5)
    return dense


def compare_embedders(ours, theirs, where):
    """encode, encode_query, encode_document, an explicit prompt and a prompt name, and similarity, on the
    texts above, ours (embed.Embedder) against theirs (SentenceTransformer)."""
    calls = [
        ("encode", {}),
        ("encode_query", {}),
        ("encode_document", {}),
        ("encode", {"prompt": "query: "}),
        ("encode", {"prompt_name": "query"}),
    ]
    for method, kwargs in calls:
        a = getattr(ours, method)(EMBED_TEXTS, convert_to_tensor=True, **kwargs)
        b = getattr(theirs, method)(EMBED_TEXTS, convert_to_tensor=True, **kwargs)
        assert_close(a, b, EMBED_TOL, f"{where}: {method}({kwargs})")
    assert len({tuple(row.tolist()) for row in a}) == len(EMBED_TEXTS), f"{where}: rows should differ"
    assert ours.similarity_fn_name == theirs.similarity_fn_name
    mine, official = ours.similarity(a, a[:3]), theirs.similarity(b, b[:3])
    # dot products and distances of unnormalised embeddings reach 20 and more: 1e-5 of the largest value
    assert_close(mine, official, EMBED_TOL * max(1.0, official.abs().max().item()), f"{where}: similarity")
    assert ours.dimension == a.shape[1] and ours.max_seq_length == theirs.max_seq_length
    single = ours.encode(EMBED_TEXTS[0], convert_to_tensor=True)
    assert_close(single, theirs.encode(EMBED_TEXTS[0], convert_to_tensor=True), EMBED_TOL, f"{where}: one str")


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))


def legacy_folder(backbone, folder, pooling, dense=None, normalize=False, lowercase=False, **model_config):
    """A checkpoint as the hub has them today (sentence-transformers 2 to 5), written by hand: the module types
    `sentence_transformers.models.*`, one pooling_mode_*_tokens boolean per mode, word_embedding_dimension,
    sentence_bert_config.json's max_seq_length, Normalize without a folder, Dense weights as
    linear.weight / linear.bias."""
    from safetensors.torch import save_file

    shutil.copytree(backbone, folder)
    modules = [("Transformer", ""), ("Pooling", "1_Pooling")]
    write_json(folder / "1_Pooling" / "config.json", {"word_embedding_dimension": 32, **pooling})
    if dense is not None:
        config, weights = dense
        modules.append(("Dense", "2_Dense"))
        write_json(folder / "2_Dense" / "config.json", config)
        save_file(weights, folder / "2_Dense" / "model.safetensors")
    if normalize:
        modules.append(("Normalize", f"{len(modules)}_Normalize"))
    types = [
        {"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers.models.{t}"}
        for i, (t, p) in enumerate(modules)
    ]
    write_json(folder / "modules.json", types)
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": lowercase})
    version = {"sentence_transformers": "3.3.1", "transformers": "4.48.0", "pytorch": "2.5.1"}
    write_json(folder / "config_sentence_transformers.json", {"__version__": version, **model_config})
    return folder


def legacy_pooling(*modes, include_prompt=None):
    keys = {
        "cls": "pooling_mode_cls_token",
        "mean": "pooling_mode_mean_tokens",
        "max": "pooling_mode_max_tokens",
        "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
        "weightedmean": "pooling_mode_weightedmean_tokens",
        "lasttoken": "pooling_mode_lasttoken",
    }
    config = {key: mode in modes for mode, key in keys.items()}
    return config if include_prompt is None else {**config, "include_prompt": include_prompt}


@pytest.fixture(scope="session")
def reranker_checkpoints(tmp_path_factory):
    """ModernBertForSequenceClassification checkpoints (1 and 3 labels) on the mmBERT-style tokenizer."""
    folders = {}
    for labels in (1, 3):
        folder = folders[labels] = tmp_path_factory.mktemp(f"reranker-{labels}")
        vocab = mmbert_style_tokenizer(folder).get_vocab_size()
        torch.manual_seed(labels)
        config = mb.ModernBertConfig(vocab_size=vocab, num_labels=labels, **MMBERT_TINY, **MMBERT_IDS)
        spread_weights(mb.ModernBertForSequenceClassification(config)).save_pretrained(folder)
    return folders


RERANK_QUERY = "What is the capital of France?"


RERANK_DOCS = EMBED_TEXTS[:2] + EMBED_TEXTS[4:] + ["Paris is the capital of France."]


# ----------------------------------------------------------------------------------------------------
# Reading Sentence Transformers' files: modules.json, Pooling, Dense, Normalize, in the hub's older format too;
# a plain transformers checkpoint; files it cannot run


LEGACY_CASES = {  # like the hub's checkpoints
    "nomic-style: mean, Normalize, prompts": dict(
        pooling=legacy_pooling("mean", include_prompt=True),
        normalize=True,
        prompts=PROMPTS,
        default_prompt_name=None,
        similarity_fn_name="cosine",
    ),
    "gte-style: cls, no include_prompt key, no prompts": dict(pooling=legacy_pooling("cls")),
    "cls+max, Dense (Identity), lowercase, prompt out, dot, truncate_dim": dict(
        pooling=legacy_pooling("cls", "max", include_prompt=False),
        dense="torch.nn.modules.linear.Identity",
        lowercase=True,
        prompts={"query": "Query: ", "passage": "Passage: "},
        similarity_fn_name="dot",
        truncate_dim=12,
    ),
    "no pooling flag set (mean), Dense (Tanh by default), default_prompt_name": dict(
        pooling=legacy_pooling(),
        dense=None,
        prompts={"query": "search_query: ", "classification": "classify: "},
        default_prompt_name="classification",
    ),
}


@pytest.mark.slow
@needs_sentence_transformers
@pytest.mark.parametrize("case", sorted(LEGACY_CASES))
def test_embedder_reads_the_hubs_older_files(case, embed_backbone, tmp_path):
    """Hand-written files in the hub's format (sentence-transformers reads them too): pooling booleans,
    word_embedding_dimension, max_seq_length in sentence_bert_config.json, do_lower_case, Dense with its
    activation (none written: Tanh), Normalize without a folder, prompts, default_prompt_name, truncate_dim."""
    from sentence_transformers import SentenceTransformer

    from embed import load_embedder

    spec = dict(LEGACY_CASES[case])
    pooling, normalize, lowercase = spec.pop("pooling"), spec.pop("normalize", False), spec.pop("lowercase", False)
    dense = None
    if "dense" in spec:
        width = 32 * sum(pooling[k] for k in pooling if k.startswith("pooling_mode")) or 32
        activation = spec.pop("dense")
        config = {"in_features": width, "out_features": 20, "bias": True}
        config |= {} if activation is None else {"activation_function": activation}
        torch.manual_seed(2)
        weights = {"linear.weight": torch.randn(20, width) * width**-0.5, "linear.bias": torch.randn(20) * 0.5}
        dense = (config, weights)
    folder = legacy_folder(embed_backbone, tmp_path / "legacy", pooling, dense, normalize, lowercase, **spec)
    theirs = SentenceTransformer(str(folder), device="cpu")
    ours = load_embedder(folder)
    compare_embedders(ours, theirs, case)
    if lowercase:  # the tokenizer lowercases: upper and lower case give the same embedding
        assert (ours.encode("ABC") == ours.encode("abc")).all(), "do_lower_case"


@pytest.mark.slow
@needs_sentence_transformers
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_embedder_without_sentence_transformers_files_pools_as_the_config_says(pooling, embed_backbone, tmp_path):
    """A plain transformers checkpoint: classifier_pooling decides (sentence-transformers itself would take
    mean pooling whatever the config says), and one warning says so."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    from embed import load_embedder

    folder = shutil.copytree(embed_backbone, tmp_path / "plain")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "classifier_pooling": pooling}))
    with pytest.warns(
        UserWarning, match=rf"no Sentence Transformers files .* classifier_pooling says \('{pooling}'\)"
    ) as caught:
        ours = load_embedder(folder)
        ours.encode(EMBED_TEXTS), ours.encode_query(EMBED_TEXTS)
    assert len(caught) == 1
    transformer = Transformer(str(folder))  # tokenizer_config.json says no limit: max_position_embeddings decides
    theirs = SentenceTransformer(modules=[transformer, Pooling(32, pooling)], device="cpu")
    assert ours.max_seq_length == theirs.max_seq_length == 8192
    compare_embedders(ours, theirs, f"no ST files, {pooling}")


def test_embedder_files_it_cannot_run_are_clear_errors(embed_backbone, tmp_path):
    from embed import load_embedder, load_reranker

    folder = legacy_folder(embed_backbone, tmp_path / "custom", legacy_pooling("mean"))
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"module '2' has type 'sentence_transformers.models.LayerNorm', which this"):
        load_embedder(folder)
    modules[2]["type"] = "my_package.MyPooling"
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"type 'my_package.MyPooling'"):
        load_embedder(folder)
    modules[1:] = [{"idx": 1, "name": "1", "path": "1_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(
        ValueError, match=r"has \['Transformer', 'Normalize'\]: an embedder here is a Transformer, a Pooling"
    ):
        load_embedder(folder)
    folder = legacy_folder(embed_backbone, tmp_path / "bad-pooling", {"pooling_mode": "median"})
    with pytest.raises(ValueError, match=r"unknown pooling mode 'median'"):
        load_embedder(folder)
    folder = legacy_folder(
        embed_backbone,
        tmp_path / "dense",
        legacy_pooling("mean"),
        ({"in_features": 32, "out_features": 4, "activation_function": "my.Act"}, {}),
    )
    with pytest.raises(ValueError, match=r"activation 'my.Act' is not a torch.nn module"):
        load_embedder(folder)
    write_json(folder / "config_sentence_transformers.json", {"model_type": "CrossEncoder"})
    with pytest.raises(ValueError, match=r"holds a CrossEncoder .*: load it with load_reranker"):
        load_embedder(folder)
    with pytest.raises(ValueError, match=r"is not a reranker: its weights have no classifier head"):
        load_reranker(embed_backbone)


# ----------------------------------------------------------------------------------------------------
# Pooling and packed batches: every pooling mode (pool), batches by token budget in input order (token_batches)


POOLINGS = ["cls", "mean", "max", "lasttoken", "mean_sqrt_len_tokens", "weightedmean", ("cls", "max", "mean")]


SIMILARITY_NAMES = ["cosine", "dot", "euclidean", "manhattan"]


@pytest.mark.slow
@needs_sentence_transformers
@pytest.mark.parametrize("pooling", POOLINGS, ids=lambda p: p if isinstance(p, str) else "+".join(p))
def test_embedder_matches_sentence_transformers_on_its_own_saves(pooling, st_transformer, tmp_path):
    """Every pooling mode, with and without include_prompt; Dense (GELU) and Normalize with the prompt in,
    the bare pooling with it out; each similarity function in turn; the files sentence-transformers 6 writes."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling

    from embed import load_embedder

    for include_prompt in (True, False):
        modules = [st_transformer, Pooling(MMBERT_TINY["hidden_size"], pooling, include_prompt=include_prompt)]
        width = modules[1].pooling_output_dimension
        if include_prompt:
            modules += [spread_dense(Dense(width, 16, activation_function=torch.nn.GELU())), Normalize()]
        name = SIMILARITY_NAMES[(POOLINGS.index(pooling) + include_prompt) % 4]
        theirs = SentenceTransformer(modules=modules, prompts=PROMPTS, similarity_fn_name=name, device="cpu")
        theirs.save(str(tmp_path / str(include_prompt)), create_model_card=False)
        ours = load_embedder(tmp_path / str(include_prompt))
        assert ours.modes == ((pooling,) if isinstance(pooling, str) else pooling)
        assert ours.include_prompt == include_prompt
        compare_embedders(ours, theirs, f"{pooling}, include_prompt={include_prompt}")


@pytest.mark.slow
@needs_sentence_transformers
def test_embedder_batches_by_token_budget_and_keeps_the_input_order(st_transformer, tmp_path, capsys):
    """Tiny budgets (many packed batches, a text alone when over budget), a cap on texts per batch, and
    a progress bar: the same rows, in input order."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from embed import load_embedder

    theirs = SentenceTransformer(modules=[st_transformer, Pooling(32, "mean")], device="cpu")
    theirs.save(str(tmp_path), create_model_card=False)
    ours = load_embedder(tmp_path)
    texts = EMBED_TEXTS * 3
    expected = theirs.encode(texts, convert_to_tensor=True)
    for batch_tokens, batch_size in ((1, None), (40, None), (10_000, 2), (10_000, None)):
        got = ours.encode(
            texts, batch_tokens=batch_tokens, batch_size=batch_size, show_progress_bar=False, convert_to_tensor=True
        )
        assert_close(got, expected, EMBED_TOL, f"batch_tokens={batch_tokens}, batch_size={batch_size}")
    ours.encode(texts, batch_tokens=40, show_progress_bar=True)
    assert "Embedding: 100%" in capsys.readouterr().err
    ours.max_seq_length = st_transformer.max_seq_length = 9  # settable, as theirs
    try:
        a, b = ours.encode(texts, convert_to_tensor=True), theirs.encode(texts, convert_to_tensor=True)
        assert_close(a, b, EMBED_TOL, "max_seq_length 9")
    finally:
        st_transformer.max_seq_length = MAX_SEQ_LENGTH
    assert ours.encode([]).shape == (0, 32)


def test_token_batches_cover_every_text_longest_first_within_the_budget():
    from embed import token_batches

    lengths = [5, 30, 17, 1, 22, 40]
    batches = token_batches(lengths, 40, batch_size=2)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)
    assert all(len(b) <= 2 and (len(b) == 1 or sum(lengths[i] for i in b) <= 40) for b in batches)


# ----------------------------------------------------------------------------------------------------
# Embeddings and rerankers return what Sentence Transformers returns (numpy, tensors, lists)


@pytest.mark.slow
@needs_sentence_transformers
def test_embedder_and_reranker_return_what_sentence_transformers_returns(
    st_transformer, reranker_checkpoints, tmp_path
):
    """convert_to_numpy / convert_to_tensor with Sentence Transformers' defaults: numpy unless asked otherwise
    (code copied from its documentation expects that), a tensor with convert_to_tensor, a list of tensors with
    neither; one row for a single input. The same for encode_query, encode_document and a reranker's predict."""
    import numpy
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from embed import load_embedder, load_reranker

    SentenceTransformer(modules=[st_transformer, Pooling(32, "mean")], device="cpu").save(
        str(tmp_path / "st"), create_model_card=False
    )
    embedders = load_embedder(tmp_path / "st"), SentenceTransformer(str(tmp_path / "st"), device="cpu")
    rerankers = load_reranker(reranker_checkpoints[1]), CrossEncoder(str(reranker_checkpoints[1]), device="cpu")
    pairs = [(RERANK_QUERY, d) for d in RERANK_DOCS]
    calls = [(embedders, m, x) for m in ("encode", "encode_query", "encode_document") for x in (EMBED_TEXTS, "a")]
    calls += [(rerankers, "predict", x) for x in (pairs, pairs[0])]
    flags = [
        {},
        {"convert_to_tensor": True},
        {"convert_to_numpy": False},
        {"convert_to_numpy": True, "convert_to_tensor": True},
    ]
    for (ours, theirs), method, inputs in calls:
        for kwargs in flags:
            a, b = getattr(ours, method)(inputs, **kwargs), getattr(theirs, method)(inputs, **kwargs)
            where = f"{method}({type(inputs).__name__}, {kwargs})"
            assert type(a) is type(b), f"{where}: ours gives a {type(a).__name__}, theirs a {type(b).__name__}"
            a, b = (a, b) if isinstance(a, list) else ([a], [b])
            assert len(a) == len(b), where
            for x, y in zip(a, b):
                assert x.shape == y.shape and x.dtype == y.dtype, (
                    f"{where}: {x.shape} {x.dtype}, theirs {y.shape} {y.dtype}"
                )
                x, y = (torch.as_tensor(numpy.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in (x, y))
                assert_close(x, y, EMBED_TOL, where)
    bf16 = load_embedder(tmp_path / "st", dtype="bf16").encode(EMBED_TEXTS)  # numpy has no bf16: float32, as theirs
    assert isinstance(bf16, numpy.ndarray) and bf16.dtype == numpy.float32


# ----------------------------------------------------------------------------------------------------
# Rerankers: load_reranker, predict and rank, against CrossEncoder


def compare_rerankers(ours, theirs, where):
    """predict on pairs whose truncation cuts the longer text first (query or document), and rank."""
    pairs = [(RERANK_QUERY, d) for d in RERANK_DOCS] + [(d, RERANK_QUERY) for d in RERANK_DOCS]
    a, b = ours.predict(pairs, convert_to_tensor=True), theirs.predict(pairs, convert_to_tensor=True)
    assert_close(a, b, EMBED_TOL, f"{where}: predict")
    if ours.num_labels == 1:
        mine, official = ours.rank(RERANK_QUERY, RERANK_DOCS), theirs.rank(RERANK_QUERY, RERANK_DOCS)
        assert [r["corpus_id"] for r in mine] == [r["corpus_id"] for r in official], where
        assert max(abs(r["score"] - s["score"]) for r, s in zip(mine, official)) < EMBED_TOL, where
        top = ours.rank(RERANK_QUERY, RERANK_DOCS, top_k=2, return_documents=True)
        official = theirs.rank(RERANK_QUERY, RERANK_DOCS, top_k=2, return_documents=True)
        assert [(r["corpus_id"], r["text"]) for r in top] == [(r["corpus_id"], r["text"]) for r in official], where
        a, b = ours.predict(pairs[0], convert_to_tensor=True), theirs.predict(pairs[0], convert_to_tensor=True)
        assert_close(a, b, EMBED_TOL, where)


@pytest.mark.slow
@needs_sentence_transformers
@pytest.mark.parametrize("activation", [None, torch.nn.Identity, torch.nn.Tanh])
def test_reranker_matches_cross_encoder_on_its_own_saves(activation, reranker_checkpoints, tmp_path):
    """CrossEncoder's files (config_sentence_transformers.json's activation_fn; sigmoid for one label when
    none is given), its max_length, pairs tokenized as <bos> query <eos> document <eos>."""
    from sentence_transformers import CrossEncoder

    from embed import load_reranker

    fn = None if activation is None else activation()
    saved = CrossEncoder(str(reranker_checkpoints[1]), max_length=MAX_SEQ_LENGTH, activation_fn=fn, device="cpu")
    saved.save(str(tmp_path), create_model_card=False)
    theirs, ours = CrossEncoder(str(tmp_path), device="cpu"), load_reranker(tmp_path)
    assert type(ours.activation_fn) is type(theirs.activation_fn) is (activation or torch.nn.Sigmoid)
    assert ours.max_seq_length == theirs.max_seq_length == MAX_SEQ_LENGTH
    compare_rerankers(ours, theirs, f"activation {activation}")


@pytest.mark.slow
@needs_sentence_transformers
@pytest.mark.parametrize(
    "labels, written",
    [
        (1, {}),
        (1, {"sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Tanh", "version": "4.1.0"}}),
        (1, {"sbert_ce_default_activation_function": "torch.nn.modules.linear.Identity"}),
        (3, {}),
    ],
    ids=["sigmoid", "config-activation_fn", "sbert_ce_default", "3-labels-identity"],
)
def test_reranker_without_sentence_transformers_files_takes_the_activation_config_json_names(
    labels, written, reranker_checkpoints, tmp_path
):
    """A plain transformers checkpoint, as the hub's rerankers mostly are: the activation named in config.json
    (CrossEncoder 4's sentence_transformers.activation_fn, or its older key), else sigmoid for one label and
    none for more; rank needs one label."""
    from sentence_transformers import CrossEncoder

    from embed import load_reranker

    folder = shutil.copytree(reranker_checkpoints[labels], tmp_path / "plain")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **written}))
    ours, theirs = load_reranker(folder), CrossEncoder(str(folder), device="cpu")
    assert type(ours.activation_fn) is type(theirs.activation_fn)
    compare_rerankers(ours, theirs, str(written))
    if labels != 1:
        assert ours.predict((RERANK_QUERY, "x")).shape == (3,)
        with pytest.raises(ValueError, match="rank needs a reranker with one label; this one has 3"):
            ours.rank(RERANK_QUERY, RERANK_DOCS)


# ----------------------------------------------------------------------------------------------------
# Late interaction (ColBERT), as PyLate computes it: against PyLate's golden files, wrong variants, MaxSim and rerank,
# what encode returns, and what a ColBERT folder may say that this loader cannot honour.
#
# PyLate cannot share this environment (it pins sentence-transformers 5.3 and transformers <= 5.3), so
# tools/make_pylate_goldens.py runs it in its own, on random-weight ModernBERT ColBERT folders that PyLate saves, and
# keeps the folders and PyLate's outputs under fixtures/colbert_*/ (golden.json says how and with what). Each setting
# is compared on every token id, vector and score, in fp32, to 1e-5. PyLate is not needed here; the real tokenizer is.
# The folders are PyLate's, with two files made small
# (tools/make_pylate_goldens.py): model.safetensors gzipped, and tokenizer.json without the real tokenizer's
# vocabulary and merges, which colbert_folder puts back from ../shared.

COLBERT_FIXTURES = Path(HERE, "fixtures")
COLBERT_SETTINGS = sorted(p.name for p in COLBERT_FIXTURES.glob("colbert_*") if (p / "golden.json").is_file())
COLBERT_TOL = 1e-5


def unpack_colbert_fixture(name, folder):
    """fixtures/NAME as PyLate wrote it, in `folder`: model.safetensors unzipped (checked against the sha256
    recorded when PyLate wrote it), tokenizer.json's vocabulary and merges put back from the real tokenizer."""
    source = COLBERT_FIXTURES / name
    meta = json.loads((source / "golden.json").read_text(encoding="utf-8"))
    packed = ("golden.json", "golden.safetensors", "model.safetensors.gz", "tokenizer.json")
    shutil.copytree(source, folder, ignore=lambda where, names: [n for n in names if n in packed])
    weights = gzip.decompress((source / "model.safetensors.gz").read_bytes())
    assert hashlib.sha256(weights).hexdigest() == meta["files"]["model.safetensors"], f"{name}: weights changed"
    (folder / "model.safetensors").write_bytes(weights)
    tokenizer = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    real = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["model"] |= {"vocab": real["model"]["vocab"], "merges": real["model"]["merges"]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    return meta


COLBERT_CASES = {}  # setting -> its case, made once a session (the wrong variants ask for the settings in turn)


@pytest.fixture(scope="session", params=COLBERT_SETTINGS)
def colbert_case(request, tmp_path_factory):
    """One setting: its unpacked folder, PyLate's outputs (golden), its texts and arguments (meta), our model."""
    if not HAS_TOKENIZER:
        pytest.skip(NO_TOKENIZER)
    name = request.param
    if name not in COLBERT_CASES:
        folder = tmp_path_factory.mktemp(name) / "folder"
        meta = unpack_colbert_fixture(name, folder)
        golden = load_file(COLBERT_FIXTURES / name / "golden.safetensors")
        model = embed.load_colbert(folder)
        COLBERT_CASES[name] = types.SimpleNamespace(name=name, folder=folder, meta=meta, golden=golden, model=model)
    return COLBERT_CASES[name]


def colbert_differences(colbert, case, **encode_kwargs):
    """What differs from PyLate by more than COLBERT_TOL: ["query 3 vectors: ...", ...]; [] when nothing does.
    Token ids and masks first (what the model reads), then encode's matrices, then the MaxSim scores."""
    found, vectors = [], {}
    golden = case.golden
    for kind, is_query in (("query", True), ("document", False)):
        texts = case.meta["queries" if is_query else "documents"]
        ids, real = colbert.tokenize(texts, is_query)
        vectors[kind] = colbert.encode(texts, is_query=is_query, convert_to_tensor=True, **encode_kwargs)
        for i, text in enumerate(texts):
            theirs = golden[f"{kind}_ids.{i}"].tolist()
            if ids[i] != theirs:
                found.append(f"{kind} {i} ids: {ids[i]} != PyLate's {theirs} ({text!r})")
            if is_query:
                attended = [j < real[i] or colbert.attend_to_expansion_tokens for j in range(len(ids[i]))]
                if attended != golden[f"query_attention.{i}"].bool().tolist():
                    found.append(f"query {i} attention mask differs from PyLate's ({text!r})")
            elif [t not in colbert.skiplist for t in ids[i]] != golden[f"document_kept.{i}"].tolist():
                found.append(f"document {i}: the skip-list keeps other tokens than PyLate's ({text!r})")
            ours, ref = vectors[kind][i], golden[f"{kind}_vectors.{i}"]
            if ours.shape != ref.shape:
                found.append(f"{kind} {i} vectors: shape {tuple(ours.shape)} != PyLate's {tuple(ref.shape)}")
            elif (diff := (ours - ref).abs().max().item()) > COLBERT_TOL:
                found.append(f"{kind} {i} vectors: max diff {diff:.3g} ({text!r})")
    scores = embed.colbert_scores(vectors["query"], vectors["document"])
    if (diff := (scores - golden["scores"]).abs().max().item()) > COLBERT_TOL:
        found.append(f"scores: max diff {diff:.3g}")
    return found


@needs_tokenizer
def test_colbert_matches_pylate_on_its_own_saves(colbert_case):
    """Every token id PyLate's model reads (prefix after [CLS], [MASK] expansion, truncation, stripped and
    lowercased text), its attention and skip-list masks, every vector of encode, every MaxSim score: to 1e-5."""
    assert colbert_differences(colbert_case.model, colbert_case) == []
    model, theirs = colbert_case.model, colbert_case.meta["token_ids"]  # PyLate's ids: [UNK] for a word it lacks
    ours = [model.query_prefix_id, model.document_prefix_id, model.skiplist, model.expansion_id]
    assert ours == [theirs["query_prefix"], theirs["document_prefix"], theirs["skiplist"], theirs["expansion"]]
    arguments = colbert_case.meta["colbert_arguments"]
    for key in ("query_prefix", "document_prefix", "query_length", "document_length", "attend_to_expansion_tokens"):
        if key in arguments:  # what PyLate was told is what the folder says and what we read
            assert getattr(colbert_case.model, key) == arguments[key], key
    last_dense = colbert_case.meta["changed_before_saving"].get("tanh_then_residual", arguments["embedding_size"])
    assert colbert_case.model.dimension == last_dense


def colbert_prefix_moved(where):
    """A wrong variant of ColBERT.tokenize: the prefix token before [CLS] (where=0) or at the end (where=None)."""

    def tokenize(self, texts, is_query):
        ids, real = embed.ColBERT.tokenize(self, texts, is_query)
        prefix = self.query_prefix_id if is_query else self.document_prefix_id
        if prefix is None:
            return ids, real
        moved = []
        for i, n in zip(ids, real):  # [CLS] prefix ... [SEP] expansion -> wherever asked
            rest = i[:1] + i[2:]
            moved.append([prefix, *rest] if where == 0 else [*rest[: n - 1], prefix, *rest[n - 1 :]])
        return moved, real

    return tokenize


def colbert_arguments(name):
    """What PyLate was told for a fixture (golden.json): its ColBERT arguments and what was changed before saving."""
    meta = json.loads((COLBERT_FIXTURES / name / "golden.json").read_text(encoding="utf-8"))
    return meta["colbert_arguments"] | meta["changed_before_saving"]


COLBERT_VARIANTS = {  # name -> (whether a fixture has the detail, given its arguments; what to set on our model)
    "no query expansion": (lambda a: a.get("do_query_expansion", True), lambda m: {"do_query_expansion": False}),
    "expansion attended the other way": (
        lambda a: a.get("do_query_expansion", True),
        lambda m: {"attend_to_expansion_tokens": not m.attend_to_expansion_tokens},
    ),
    "no skip-list": (lambda a: a.get("skiplist_words") != [], lambda m: {"skiplist": []}),
    "prefix before [CLS]": (
        lambda a: a.get("document_prefix") != "",
        lambda m: {"tokenize": types.MethodType(colbert_prefix_moved(0), m)},
    ),
    "prefix after [SEP]": (
        lambda a: a.get("document_prefix") != "",
        lambda m: {"tokenize": types.MethodType(colbert_prefix_moved(None), m)},
    ),
    "text not lowercased": (lambda a: a.get("do_lower_case"), lambda m: {"lowercase": False}),
    "not normalised": (lambda a: True, lambda m: {}),  # encode(normalize_embeddings=False)
}
COLBERT_BROKEN = [
    (name, variant)
    for variant, (has, _) in COLBERT_VARIANTS.items()
    for name in COLBERT_SETTINGS
    if has(colbert_arguments(name))
]


@needs_tokenizer
@pytest.mark.parametrize("colbert_case, variant", COLBERT_BROKEN, indirect=["colbert_case"])
def test_colbert_wrong_variants_do_not_match_pylate(colbert_case, variant, monkeypatch):
    """Each detail PyLate's outputs depend on, broken on purpose, moves the vectors beyond the tolerance in
    every setting that has the detail (what shows that the comparison above can fail)."""
    model = colbert_case.model
    for key, value in COLBERT_VARIANTS[variant][1](model).items():
        monkeypatch.setattr(model, key, value)
    kwargs = {"normalize_embeddings": False} if variant == "not normalised" else {}
    found = colbert_differences(model, colbert_case, **kwargs)
    assert any("vectors" in line for line in found), f"{variant}: still matches PyLate"


def test_colbert_every_variant_breaks_some_fixture():
    assert {variant for _, variant in COLBERT_BROKEN} == set(COLBERT_VARIANTS)


def pylate_padded_maxsim(query, documents):
    """PyLate's rank.rerank, recomputed: documents padded with zero vectors to the longest, so a query vector's
    best match in a shorter document is at least 0."""
    longest = max(len(d) for d in documents)
    best = [(query @ d.T).amax(dim=1) for d in documents]
    return torch.stack([(b.clamp(min=0) if len(d) < longest else b).sum() for b, d in zip(best, documents)])


@needs_tokenizer
def test_colbert_scores_leave_out_the_padding_that_pylates_rerank_counts(colbert_case):
    """Ours: MaxSim over each document's own vectors, PyLate's colbert_scores on each pair alone, and rerank
    orders by it. PyLate's rank.rerank pads each query's documents with zero vectors, so that a negative best
    match counts as 0 in every document shorter than the longest: its scores are exactly that, recomputed from
    our vectors (and so are colbert_scores' on the padded batch), and here padding never reaches a score."""
    golden, meta = colbert_case.golden, colbert_case.meta
    queries = colbert_case.model.encode(meta["queries"], convert_to_tensor=True)
    documents = colbert_case.model.encode(meta["documents"], is_query=False, convert_to_tensor=True)
    n = len(documents)
    ours = embed.rerank([list(range(n))] * len(queries), queries, [documents] * len(queries))
    for i, ranked in enumerate(ours):
        assert [r["id"] for r in ranked] == golden["scores"][i].argsort(descending=True).tolist()
        assert max(abs(r["score"] - golden["scores"][i, r["id"]].item()) for r in ranked) < COLBERT_TOL
        padded = pylate_padded_maxsim(queries[i], documents)
        assert (padded[golden["rerank_ids"][i]] - golden["rerank_scores"][i]).abs().max() < COLBERT_TOL
        assert (padded - golden["padded_scores"][i]).abs().max() < COLBERT_TOL


def test_colbert_padding_changes_pylates_rerank_in_some_setting():
    """The difference above is real on these fixtures: PyLate's rerank orders some query's documents otherwise."""
    changed = [
        name
        for name in COLBERT_SETTINGS
        if not torch.equal(
            (g := load_file(COLBERT_FIXTURES / name / "golden.safetensors"))["rerank_ids"],
            g["scores"].argsort(dim=1, descending=True),
        )
    ]
    assert changed, "no fixture shows the padding"


@needs_tokenizer
def test_colbert_encode_returns_what_pylate_returns(colbert_case):
    """A list of float32 numpy matrices by default (one matrix for one str), tensors with convert_to_tensor or
    convert_to_numpy=False, a list of lists for a list of lists, [] for none; the same numbers whatever the
    token budget packs together; rank and similarity from the same matrices."""
    model, meta = colbert_case.model, colbert_case.meta
    texts = meta["documents"]
    matrices = model.encode(texts, is_query=False)
    assert isinstance(matrices, list) and all(
        isinstance(m, numpy.ndarray) and m.dtype == numpy.float32 for m in matrices
    )
    assert all(m.ndim == 2 and m.shape[1] == model.dimension for m in matrices)
    one = model.encode(texts[0], is_query=False)
    assert isinstance(one, numpy.ndarray) and numpy.allclose(one, matrices[0], atol=COLBERT_TOL)
    tensors = model.encode(texts, is_query=False, convert_to_numpy=False)
    assert all(isinstance(t, torch.Tensor) for t in tensors)
    nested = model.encode([texts[:2], texts[2:3]], is_query=False, convert_to_tensor=True)
    assert [len(n) for n in nested] == [2, 1] and torch.allclose(nested[1][0], tensors[2], atol=COLBERT_TOL)
    assert model.encode([], is_query=False) == []
    for is_query, kind in ((True, "queries"), (False, "documents")):  # one text a batch: other packing, same rows
        alone = model.encode(meta[kind], is_query=is_query, batch_tokens=1, convert_to_tensor=True)
        together = model.encode(meta[kind], is_query=is_query, convert_to_tensor=True)
        assert all(torch.allclose(a, b, atol=COLBERT_TOL) for a, b in zip(alone, together))
    ranked = model.rank(meta["queries"][0], texts, top_k=3, return_documents=True)
    scores = model.similarity([model.encode(meta["queries"][0])], matrices)[0]
    assert [r["corpus_id"] for r in ranked] == scores.argsort(descending=True)[:3].tolist()
    assert all(r["text"] == texts[r["corpus_id"]] for r in ranked)
    with pytest.raises(ValueError, match="^No prompt named 'nope'"):
        model.encode(texts, prompt_name="nope")


# What a ColBERT folder may say that this loader cannot honour: a one-line error naming it.


@pytest.fixture(scope="session")
def colbert_folder(tmp_path_factory):
    """colbert_expansion unpacked once, for copies with one file changed."""
    if not HAS_TOKENIZER:
        pytest.skip(NO_TOKENIZER)
    folder = tmp_path_factory.mktemp("colbert_expansion") / "folder"
    unpack_colbert_fixture("colbert_expansion", folder)
    return folder


def colbert_folder_with(source, folder, path, change):
    """A copy of `source` (links to its files) where the JSON file `path` is change(its content)."""
    shutil.copytree(source, folder, copy_function=os.symlink)
    target = folder / path
    content = change(json.loads(target.read_text()))
    target.unlink()
    target.write_text(json.dumps(content))
    return folder


SETTINGS_FILE = "config_sentence_transformers.json"
COLBERT_BAD_FOLDERS = {  # what is wrong: (the file, how it is changed, a regex the one-line error must match)
    "a length as text": (SETTINGS_FILE, lambda c: c | {"query_length": "32"}, "query_length is '32', which is not an"),
    "a length true": (
        SETTINGS_FILE,
        lambda c: c | {"query_length": True},
        "query_length is True, which is not an int",
    ),
    "a flag as text": (
        SETTINGS_FILE,
        lambda c: c | {"attend_to_expansion_tokens": "no"},
        "is 'no', which is not true",
    ),
    "a number in the skip-list": (SETTINGS_FILE, lambda c: c | {"skiplist_words": [".", 7]}, "skiplist_words holds 7"),
    "cosine": (SETTINGS_FILE, lambda c: c | {"similarity_fn_name": "cosine"}, "'cosine'; PyLate's ColBERT has MaxSim"),
    "an embedder": (SETTINGS_FILE, lambda c: c | {"model_type": "SentenceTransformer"}, "holds a SentenceTransformer"),
    "a prefix not in the vocabulary": (
        SETTINGS_FILE,
        lambda c: c | {"query_prefix": "[X] "},
        r"query_prefix '\[X\] '",
    ),
    "a length without room": (SETTINGS_FILE, lambda c: c | {"document_length": 2}, "document_length 2 leaves no room"),
    "one without a prefix": (
        SETTINGS_FILE,
        lambda c: c | {"query_length": 1, "query_prefix": ""},
        "query_length 1 le",
    ),
    "no Dense": ("modules.json", lambda m: m[:1], r"has modules \['Transformer'\] \(modules.json\)"),
    "Dense first": ("modules.json", lambda m: [m[1], m[0]], r"has modules \['Dense', 'Transformer'\]"),
    "a Pooling": (
        "modules.json",
        lambda m: m + [{"name": "2", "path": "2", "type": "sentence_transformers.models.Pooling"}],
        "module '2' has type 'sentence_transformers.models.Pooling', which this loader does not run",
    ),
    "a path outside": ("modules.json", lambda m: [m[0], m[1] | {"path": "../x"}], "module path '../x' leaves"),
    "a Dense of another width": ("1_Dense/config.json", lambda c: c | {"in_features": 8}, "in_features is 8, but its"),
}


@pytest.mark.parametrize("case", COLBERT_BAD_FOLDERS)
def test_colbert_settings_it_cannot_honour_are_one_line_errors(case, colbert_folder, tmp_path):
    path, change, message = COLBERT_BAD_FOLDERS[case]
    folder = colbert_folder_with(colbert_folder, tmp_path / "colbert", path, change)
    with pytest.raises(ValueError, match=message) as error:
        embed.load_colbert(folder)
    assert "\n" not in str(error.value)


def test_colbert_folder_and_other_loaders_point_to_each_other(colbert_folder, tmp_path):
    """load_embedder on a ColBERT folder says which loader runs it; a folder with no modules.json is no ColBERT."""
    with pytest.raises(ValueError, match=r"holds a ColBERT .*: load it with load_colbert, or on the command line"):
        embed.load_embedder(colbert_folder)
    bare = tmp_path / "bare"
    shutil.copytree(colbert_folder, bare, copy_function=os.symlink, ignore=shutil.ignore_patterns("modules.json"))
    with pytest.raises(ValueError, match=r"has modules \[\] \(modules.json\): a ColBERT here is a Transformer"):
        embed.load_colbert(bare)


def test_colbert_hub_id_fetches_pylates_files(colbert_folder, monkeypatch):
    """A hub id goes through load.py's resolve, as the other loaders' do, and what it fetches holds PyLate's
    files (the Dense weights included)."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    asked = []
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append((repo, kw)) or str(colbert_folder)
    )
    model = embed.load_colbert("lightonai/GTE-ModernColBERT-v1", revision="main")
    assert model.folder == str(colbert_folder) and asked[0][0] == "lightonai/GTE-ModernColBERT-v1"
    assert asked[0][1]["revision"] == "main"
    files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "modules.json"]
    files += ["config_sentence_transformers.json", "sentence_bert_config.json", "1_Dense/config.json"]
    files += ["1_Dense/model.safetensors"]
    assert sorted(filter_repo_objects(files, allow_patterns=asked[0][1]["allow_patterns"])) == sorted(files)


# ----------------------------------------------------------------------------------------------------
# The command line: `python embed.py embed`, `python embed.py rerank` and `python embed.py colbert`


@pytest.mark.slow
def test_cli_embed_and_rerank_give_what_python_gives_and_one_line_errors(
    embed_backbone, reranker_checkpoints, tmp_path, monkeypatch, capsys
):
    """`embed.py embed` (texts as arguments, from a file or standard input; .npy, .safetensors or JSON lines)
    and `embed.py rerank` (documents the same three ways) give what load_embedder / load_reranker give; errors
    are one line and status 2."""
    import io

    import numpy
    from safetensors.torch import load_file

    import embed

    folder = legacy_folder(
        embed_backbone, tmp_path / "embedder", legacy_pooling("mean"), normalize=True, prompts=PROMPTS
    )
    lines = EMBED_TEXTS[:2] + EMBED_TEXTS[3:]  # one text per line: none empty
    (tmp_path / "texts.txt").write_text("\n".join(lines) + "\n")
    embedder = embed.load_embedder(folder)
    expected = embedder.encode(lines, prompt_name="query", convert_to_tensor=True)
    rc, out, err, _ = run_cli(
        "embed",
        "--model",
        folder,
        "--prompt-name",
        "query",
        "--input",
        tmp_path / "texts.txt",
        "--output",
        tmp_path / "e.npy",
        script="embed.py",
    )
    assert rc == 0 and out == f"{tmp_path / 'e.npy'}: {len(lines)} embeddings of 32 float32 values\n", err
    assert_close(torch.from_numpy(numpy.load(tmp_path / "e.npy")), expected, 1e-6, "embed --output .npy")

    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines)))
    assert (
        embed.main(["embed", "--model", str(folder), "--input", "-", "--output", str(tmp_path / "e.safetensors")]) == 0
    )
    expected = embedder.encode(lines, convert_to_tensor=True)
    assert_close(load_file(tmp_path / "e.safetensors")["embeddings"], expected, 1e-6, ".safetensors")
    capsys.readouterr()
    assert embed.main(["embed", "--model", str(folder), *lines[:2]]) == 0
    printed = torch.tensor([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert_close(printed, expected[:2], 1e-6, "embed, JSON lines on standard output")

    reranker = embed.load_reranker(reranker_checkpoints[1])
    assert embed.main(["rerank", "--model", str(reranker_checkpoints[1]), "--query", RERANK_QUERY, *RERANK_DOCS]) == 0
    assert_ranked(capsys.readouterr().out, reranker.rank(RERANK_QUERY, RERANK_DOCS))

    bad = {
        ("embed", "--output", "e.txt", "a"): r"--output 'e.txt': name a .safetensors or a .npy file\.",
        ("embed", "--prompt-name", "passage", "a"): r"No prompt named 'passage': this checkpoint's prompts are",
        ("embed", "--input", "texts.txt", "a"): r"Give the texts as arguments or with --input, not both\.",
        ("rerank", "--query", "q", "--input", "texts.txt", "a"): r"Give the texts as arguments or with --input, not",
    }
    for (command, *args), message in bad.items():
        assert embed.main([command, "--model", str(folder), *args]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1 and re.match(rf"^error: {message}", err), err


def assert_ranked(printed, expected):
    """`embed.py rerank`'s lines (score, index, document) against Reranker.rank's results."""
    ranked = [line.split("  ", 2) for line in printed.splitlines()]
    assert [(int(i), doc) for _, i, doc in ranked] == [(r["corpus_id"], RERANK_DOCS[r["corpus_id"]]) for r in expected]
    assert [float(score) for score, _, _ in ranked] == [round(r["score"], 4) for r in expected]


def test_cli_rerank_reads_documents_from_a_file_or_standard_input(reranker_checkpoints, tmp_path, monkeypatch, capsys):
    """`embed.py rerank --input FILE` (or -, or neither: standard input), one document per line, as `embed` reads
    its texts: 2,000 documents need not go as arguments."""
    import io

    import embed

    expected = embed.load_reranker(reranker_checkpoints[1]).rank(RERANK_QUERY, RERANK_DOCS)
    (tmp_path / "docs.txt").write_text("\n".join(RERANK_DOCS) + "\n")
    rerank = ["rerank", "--model", str(reranker_checkpoints[1]), "--query", RERANK_QUERY]
    for source in (["--input", str(tmp_path / "docs.txt")], ["--input", "-"], []):
        monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(RERANK_DOCS)))
        assert embed.main(rerank + source) == 0, capsys.readouterr().err
        assert_ranked(capsys.readouterr().out, expected)


def test_cli_names_the_command_for_the_other_kind_of_checkpoint(
    embed_backbone, reranker_checkpoints, tmp_path, capsys
):
    """`embed` on a reranker's folder, or `rerank` on an embedder's, says which command reads it (and which
    function, from Python)."""
    import embed

    embedder = legacy_folder(embed_backbone, tmp_path / "embedder", legacy_pooling("mean"))
    reranker = shutil.copytree(reranker_checkpoints[1], tmp_path / "reranker")  # with CrossEncoder's files
    transformer = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.Transformer"}
    write_json(reranker / "modules.json", [transformer])
    write_json(reranker / "config_sentence_transformers.json", {"model_type": "CrossEncoder"})
    cases = [
        (["rerank", "--model", str(embedder), "--query", "q", "a"], "a SentenceTransformer", "load_embedder", "embed"),
        (["embed", "--model", str(reranker), "a"], "a CrossEncoder", "load_reranker", "rerank"),
    ]
    for argv, kind, function, command in cases:
        assert embed.main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == (
            f"error: {str(argv[2])!r} holds {kind} (config_sentence_transformers.json): load it with {function}, "
            f"or on the command line `python embed.py {command}`.\n"
        )


# `python embed.py colbert`: the documents ranked by MaxSim, as `rerank` prints them.


def colbert_cli_lines(out):
    """`score  index  text` lines -> [(score, index, text)]."""
    return [(float(s), int(i), t) for s, i, t in (line.split("  ", 2) for line in out.splitlines())]


@pytest.mark.slow
@needs_tokenizer
def test_colbert_cli_ranks_by_maxsim(colbert_folder, tmp_path, capsys):
    """`embed.py colbert` (documents as arguments or from a file; --top-k) prints them best first by MaxSim, as
    PyLate scores them; an error is one line and status 2."""
    golden = load_file(COLBERT_FIXTURES / "colbert_expansion" / "golden.safetensors")
    meta = json.loads((COLBERT_FIXTURES / "colbert_expansion" / "golden.json").read_text())
    query, documents = meta["queries"][0], meta["documents"]
    assert embed.main(["colbert", "--model", str(colbert_folder), "--query", query, *documents]) == 0
    lines = colbert_cli_lines(capsys.readouterr().out)
    assert [i for _, i, _ in lines] == golden["scores"][0].argsort(descending=True).tolist()
    assert all(abs(s - golden["scores"][0, i].item()) < 1e-4 for s, i, _ in lines)
    (tmp_path / "docs.txt").write_text("\n".join(documents[:4]) + "\n")
    assert (
        embed.main(
            [
                "colbert",
                "--model",
                str(colbert_folder),
                "--query",
                query,
                "--input",
                str(tmp_path / "docs.txt"),
                "--top-k",
                "2",
            ]
        )
        == 0
    )
    assert [i for _, i, _ in colbert_cli_lines(capsys.readouterr().out)] == golden["scores"][0, :4].argsort(
        descending=True
    )[:2].tolist()
    assert embed.main(["colbert", "--model", str(tmp_path), "--query", query, "x"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.slow
@needs_tokenizer
def test_colbert_cli_in_a_subprocess_reads_standard_input(colbert_folder):
    """`python embed.py colbert --model F --query Q` with the documents on standard input, as a user runs it."""
    meta = json.loads((COLBERT_FIXTURES / "colbert_expansion" / "golden.json").read_text())
    query, documents = meta["queries"][1], meta["documents"]
    command = [
        sys.executable,
        str(Path(HERE, "embed.py")),
        "colbert",
        "--model",
        str(colbert_folder),
        "--query",
        query,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(command, input="\n".join(documents), capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    ranked = embed.load_colbert(colbert_folder).rank(query, documents)
    assert [i for _, i, _ in colbert_cli_lines(p.stdout)] == [r["corpus_id"] for r in ranked]
    p = subprocess.run(
        [*command[:4], "/no/such/folder", "--query", query, "x"], capture_output=True, text=True, env=env
    )
    assert p.returncode == 2 and p.stdout == "" and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1


# The offline recipe of the documentation: a tiny ColBERT folder written by hand (random weights, the real
# tokenizer, prefixes it already has), then the command line on it. Run here as printed, from a checkout's root.
COLBERT_RECIPE = """\
python - <<'EOF'
import json, os, shutil, torch
from safetensors.torch import save_file
from modernbert import ModernBertConfig, ModernBertModel
ModernBertModel(ModernBertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4)).save_pretrained("tiny")
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(f"../shared/data/modernbert-base/{name}", "tiny")
os.makedirs("tiny/1_Dense")
save_file({"linear.weight": torch.randn(16, 64) / 8}, "tiny/1_Dense/model.safetensors")
json.dump({"in_features": 64, "out_features": 16, "bias": False}, open("tiny/1_Dense/config.json", "w"))
T, D = "sentence_transformers.models.Transformer", "pylate.models.Dense.Dense"
json.dump([{"path": "", "type": T}, {"path": "1_Dense", "type": D}], open("tiny/modules.json", "w"))
prefixes = {"query_prefix": "[unused0]", "document_prefix": "[unused1]"}  # tokens the tokenizer has
json.dump(prefixes, open("tiny/config_sentence_transformers.json", "w"))
EOF
python embed.py colbert --model tiny --query "What is ModernBERT?" "An encoder." "A city in France."
"""


@pytest.mark.slow
@needs_tokenizer
def test_colbert_recipe_runs_as_printed(tmp_path):
    """The recipe, in a shell, from a checkout's root with ../shared beside it (links to ours)."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("embed.py", "load.py", "modernbert.py"):
        (root / name).symlink_to(Path(HERE, name))
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "modernbert-base").symlink_to(TOKENIZER_DIR)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    p = subprocess.run(["bash", "-c", COLBERT_RECIPE], cwd=root, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = colbert_cli_lines(p.stdout)
    assert [i for _, i, _ in lines] in ([0, 1], [1, 0]), p.stdout  # the two documents, best first
    assert lines[0][0] >= lines[1][0], p.stdout
    model = embed.load_colbert(root / "tiny")
    assert (model.query_length, model.document_length, model.dimension) == (32, 180, 16)
    assert model.encode("What is ModernBERT?").shape == (32, 16)  # [MASK]-expanded to query_length


# ----------------------------------------------------------------------------------------------------
# docs/embeddings.md's and README's hub snippets, run as written


def test_docs_embedding_snippets(embed_backbone, reranker_checkpoints, tmp_path, monkeypatch, capsys):
    """docs/embeddings.md's Python snippet and two commands, and README's snippet, as written, with small random
    checkpoints (an embedder with nomic's prompts, a one-label reranker) in place of the hub ids. (test_docs.py
    skips them: they need the hub.)"""
    import shlex

    import numpy

    import embed

    page = Path(HERE, "docs", "embeddings.md").read_text()
    section = page.split("## From Python and the command line")[1].split("\n## ")[0]
    (python,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    (bash,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    embedder = legacy_folder(
        embed_backbone, tmp_path / "embedder", legacy_pooling("mean"), normalize=True, prompts=PROMPTS
    )
    folders = {
        "nomic-ai/modernbert-embed-base": embedder,
        "Alibaba-NLP/gte-reranker-modernbert-base": reranker_checkpoints[1],
    }
    for hub_id, folder in folders.items():
        python = python.replace(f'"{hub_id}"', repr(str(folder)))
    namespace = {}
    exec(python, namespace)
    assert namespace["scores"].shape == (1, 2) and sorted(r["corpus_id"] for r in namespace["ranking"]) == [0, 1]
    expected = embed.load_embedder(embedder).encode(["What is ModernBERT?"], prompt="search_query: ")
    assert isinstance(namespace["queries"], numpy.ndarray), "encode returns numpy, as Sentence Transformers does"
    assert_close(
        torch.from_numpy(namespace["queries"]), torch.from_numpy(expected), 0, "docs/embeddings.md: the query prompt"
    )

    monkeypatch.chdir(tmp_path)
    (tmp_path / "questions.txt").write_text("What is ModernBERT?\nWhere is Paris?\n")
    commands = [shlex.split(line) for line in bash.strip().splitlines() if not line.startswith("#")]
    assert [c[:3] for c in commands] == [["python", "embed.py", "embed"], ["python", "embed.py", "rerank"]]
    for command in commands:
        assert embed.main([str(folders.get(arg, arg)) for arg in command[2:]]) == 0
    assert numpy.load(tmp_path / "q.npy").shape == (2, 32)
    assert len(capsys.readouterr().out.splitlines()) == 2 + 1  # the embed summary line, then two ranked documents
    readme = Path(HERE, "README.md").read_text().split("## Embeddings and rerankers")[1].split("\n## ")[0]
    readme = next(s for s in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "nomic-ai" in s)
    for hub_id, folder in folders.items():
        readme = readme.replace(f'"{hub_id}"', repr(str(folder)))
    namespace = {}
    exec(readme, namespace)  # README's hub snippet too
    assert namespace["scores"].shape == (1, 1)
