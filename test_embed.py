"""Tests of embed.py, in the file's order: sentence embeddings and rerankers against Sentence Transformers itself
(the oracle), on folders it saves (its version 6 format) and on folders written by hand as the hub's older
checkpoints have them (which it must read too), with the mmBERT-style tokenizer (conftest.py) and small random
ModernBERTs; fp32, to 1e-5. Then the command line and README's snippets. Each test that builds a
SentenceTransformer or a CrossEncoder is marked slow (importing sentence_transformers alone takes seconds).
"""

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import modernbert as mb
from conftest import HERE, MMBERT_IDS, MMBERT_TINY, assert_close, mmbert_style_tokenizer, run_cli, spread_weights

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
# The command line: `python embed.py embed` and `python embed.py rerank`


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


# ----------------------------------------------------------------------------------------------------
# README's "Embeddings and rerankers", run as written


def test_readme_embedding_snippets(embed_backbone, reranker_checkpoints, tmp_path, monkeypatch, capsys):
    """README's "Embeddings and rerankers": the Python snippet and the two commands, as written, with small
    random checkpoints (an embedder with nomic's prompts, a one-label reranker) in place of the hub ids."""
    import shlex

    import numpy

    import embed

    section = Path(HERE, "README.md").read_text().split("## Embeddings and rerankers")[1].split("\n## ")[0]
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
    assert_close(torch.from_numpy(namespace["queries"]), torch.from_numpy(expected), 0, "README: the query prompt")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "questions.txt").write_text("What is ModernBERT?\nWhere is Paris?\n")
    commands = [shlex.split(line) for line in bash.strip().splitlines()]
    assert [c[:3] for c in commands] == [["python", "embed.py", "embed"], ["python", "embed.py", "rerank"]]
    for command in commands:
        assert embed.main([str(folders.get(arg, arg)) for arg in command[2:]]) == 0
    assert numpy.load(tmp_path / "q.npy").shape == (2, 32)
    assert len(capsys.readouterr().out.splitlines()) == 2 + 1  # the embed summary line, then two ranked documents
