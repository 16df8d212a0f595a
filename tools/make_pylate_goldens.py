"""Golden files for embed.py's ColBERT (late-interaction) path, written by PyLate itself.

PyLate 1.6 pins sentence-transformers 5.3 and transformers <= 5.3, so it cannot share the test environment
(transformers 5.23, sentence-transformers 6); its fast-plaid (the PLAID index only) pins torch 2.9, so a plain
`pip install pylate` is refused beside torch 2.13. Encoding and scoring need only this, in a venv of its own:

    python3 -m venv ../venv-pylate && . ../venv-pylate/bin/activate
    pip install torch==2.13.0
    pip install sentence-transformers==5.3.0 transformers==5.3.0 datasets accelerate pandas ujson==5.12.0
    pip install --no-deps pylate==1.6.0 fastkmeans==0.5.0
    python tools/make_pylate_goldens.py ../shared/data/modernbert-base

The argument is a folder holding the real ModernBERT tokenizer (tokenizer.json, tokenizer_config.json). For each
of SETTINGS, a random-weight tiny ModernBERT (transformers' own class) is made into a ColBERT by
pylate.models.ColBERT, which adds the Dense projection and the prefix tokens; its weights are spread so that every
layer counts (fixtures/make_fixtures.py's make_every_layer_count), PyLate saves it, loads the saved folder again,
and that copy encodes QUERIES and DOCUMENTS, scores every pair by MaxSim, and reranks. Written under
fixtures/<setting>/:

    PyLate's folder (less the README.md model card), with its two large files made small:
      model.safetensors.gz   the weights, gzipped: the embedding rows of the tokens the texts never use are zero,
                             so the file packs to a few kilobytes (golden.json has the unpacked file's sha256)
      tokenizer.json         without model.vocab and model.merges, which this script checks are the real
                             tokenizer's: the tests put them back from ../shared/data/modernbert-base
    golden.safetensors       per text i: query_ids.i / document_ids.i (the ids PyLate's model reads),
                             query_attention.i (its attention mask), document_kept.i (its skip-list mask),
                             query_vectors.i / document_vectors.i (encode's matrices); scores (Q, D): MaxSim of
                             each query against each document alone; rerank_ids, rerank_scores (Q, D): rank.rerank
                             of all documents for each query; padded_*: colbert_scores on a zero-padded batch
    golden.json              the texts, PyLate's arguments, the token ids it uses (prefixes, skip-list, expansion),
                             the versions and the machine

The weights are drawn once per setting from a fixed seed, so a rerun on another CPU moves the outputs in their last
digits only (see fixtures/VERSIONS.json); the tests' tolerance is 1e-5.
"""

import argparse
import gzip
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "fixtures")
sys.path.insert(0, ROOT)
from fixtures.make_fixtures import machine_facts, make_every_layer_count  # noqa: E402 (the repository's root first)

# A 4-layer ModernBERT (G L L G) with a +-8 window, so the longer texts below cross it.
TINY = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    local_attention=16,
    max_position_embeddings=512,
)
QUERIES = [
    "What is ModernBERT?",
    "how do plants make energy",
    "",
    "  Paris, France!  ",
    "Which encoder reads long documents, alternates local and global attention, and was trained on two "
    "trillion tokens of text, code and science?",  # over every query_length below
]
DOCUMENTS = [
    "ModernBERT is an encoder, trained on 2 trillion tokens; it reads 8,192 tokens at once.",
    "Plants create energy through a process known as photosynthesis.",
    "",
    "Paris is the capital of France!!! (And its largest city.)",
    "...",
    "  Leading and trailing spaces are stripped.  ",
    "The ColBERT model encodes each token of a document separately; a query is scored against a document by "
    "summing, over the query's tokens, the best similarity with any of the document's tokens. It is called late "
    "interaction, since query and document meet only at the very end, after both were encoded.",  # truncated
    "A short one.",
    "Hello, World: THE END.",
]
# name -> (seed, pylate.models.ColBERT's keyword arguments, what is changed before saving)
SETTINGS = {
    # PyLate's defaults ("[Q] " and "[D] " prefixes added as new tokens, the punctuation skip-list, [MASK]
    # expansion that no original token attends to), lengths shortened
    "colbert_expansion": (
        11,
        dict(embedding_size=16, query_length=20, document_length=40),
        {},
    ),
    # expansion tokens attended to; prefixes the tokenizer has already; a skip-list with words, a token that is
    # a word with its space ("Ġthe") and one the vocabulary lacks (PyLate maps it to [UNK])
    "colbert_attended": (
        12,
        dict(
            embedding_size=24,
            query_prefix="[unused0]",
            document_prefix="[unused1]",
            query_length=24,
            document_length=24,
            attend_to_expansion_tokens=True,
            skiplist_words=[",", ".", "!", "the", "Ġthe", "not-a-token"],
        ),
        {},
    ),
    # no expansion, no query prefix, a new document prefix, no skip-list, lowercased input, and two Dense
    # modules: Tanh with a bias, then a residual projection
    "colbert_plain": (
        13,
        dict(
            embedding_size=40,
            bias=True,
            query_prefix="",
            document_prefix="<doc>",
            do_query_expansion=False,
            query_length=10,
            document_length=30,
            skiplist_words=[],
        ),
        {"do_lower_case": True, "tanh_then_residual": 16},
    ),
}


def build(tokenizer_dir, seed, kwargs, changes, work):
    """A PyLate ColBERT on a random tiny ModernBERT with the real tokenizer, weights spread, saved to `work`."""
    import transformers
    from pylate import models

    base = os.path.join(work, "base")
    ids = {k: v for k, v in json.load(open(os.path.join(tokenizer_dir, "config.json"))).items() if k.endswith("_id")}
    torch.manual_seed(seed)
    config = transformers.ModernBertConfig(vocab_size=50368, **TINY, **ids)
    transformers.ModernBertModel(config).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), base)
    model = models.ColBERT(base, device="cpu", **kwargs)
    if changes.get("do_lower_case"):
        model[0].do_lower_case = True
    if out := changes.get("tanh_then_residual"):
        model[1].activation_function = torch.nn.Tanh()
        model.append(models.Dense(model[1].out_features, out, bias=False, use_residual=True))
    make_every_layer_count(model, seed)
    used = set()
    for is_query in (True, False):
        for text in QUERIES + DOCUMENTS:
            used |= set(model.tokenize([text], is_query=is_query)["input_ids"][0].tolist())
    embeddings = model[0].auto_model.embeddings.tok_embeddings.weight
    with torch.no_grad():  # the rows no text uses: zeros, so that the weights pack small
        unused = torch.ones(embeddings.shape[0], dtype=torch.bool)
        unused[sorted(used)] = False
        embeddings[unused] = 0
    saved = os.path.join(work, "saved")
    model.save(saved)
    return saved


def goldens(folder):
    """PyLate's outputs on the saved folder, loaded afresh."""
    from pylate import models, rank, scores

    model = models.ColBERT(folder, device="cpu")
    out = {}
    for kind, texts, is_query in (("query", QUERIES, True), ("document", DOCUMENTS, False)):
        vectors = model.encode(texts, is_query=is_query, convert_to_tensor=True)
        for i, text in enumerate(texts):
            features = model.tokenize([text], is_query=is_query)
            out[f"{kind}_ids.{i}"] = features["input_ids"][0]
            if is_query:
                out[f"query_attention.{i}"] = features["attention_mask"][0]
            else:
                out[f"document_kept.{i}"] = model.skiplist_mask(features["input_ids"], model.skiplist)[0]
            out[f"{kind}_vectors.{i}"] = vectors[i]
    queries = [out[f"query_vectors.{i}"] for i in range(len(QUERIES))]
    documents = [out[f"document_vectors.{i}"] for i in range(len(DOCUMENTS))]
    out["scores"] = torch.tensor(
        [[float(scores.colbert_scores(q[None], d[None])[0, 0]) for d in documents] for q in queries]
    )
    ranked = rank.rerank(
        documents_ids=[list(range(len(documents)))] * len(queries),
        queries_embeddings=queries,
        documents_embeddings=[documents] * len(queries),
    )
    out["rerank_ids"] = torch.tensor([[r["id"] for r in row] for row in ranked])
    out["rerank_scores"] = torch.tensor([[r["score"] for r in row] for row in ranked])
    # colbert_scores on a batch padded with zero vectors (as rank.rerank pads it): a padded slot scores 0, so a
    # query token whose best match in a shorter document is negative gets 0 there instead
    padded = torch.nn.utils.rnn.pad_sequence(documents, batch_first=True)
    out["padded_scores"] = scores.colbert_scores(
        torch.stack(queries)
        if len(set(map(len, queries))) == 1
        else torch.nn.utils.rnn.pad_sequence(queries, batch_first=True),
        padded,
    )
    return model, {k: v.detach().contiguous() for k, v in out.items()}


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_fixture(saved, tokenizer_dir, name, kwargs, changes, golden, token_ids):
    import pylate
    import safetensors.torch
    import sentence_transformers
    import transformers

    folder = os.path.join(FIXTURES, name)
    shutil.rmtree(folder, ignore_errors=True)
    replaced = ("README.md", "model.safetensors", "tokenizer.json")  # in the top folder only: 1_Dense/ has its own
    shutil.copytree(saved, folder, ignore=lambda where, names: [n for n in names if where == saved and n in replaced])
    with (
        open(os.path.join(saved, "model.safetensors"), "rb") as f,
        open(os.path.join(folder, "model.safetensors.gz"), "wb") as raw,
    ):
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:  # the same bytes on every run
            gz.write(f.read())
    theirs = json.load(open(os.path.join(saved, "tokenizer.json"), encoding="utf-8"))
    real = json.load(open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8"))
    merges = [m if isinstance(m, str) else " ".join(m) for m in theirs["model"]["merges"]]
    assert theirs["model"]["vocab"] == real["model"]["vocab"], "PyLate changed the vocabulary"
    assert merges == real["model"]["merges"], "PyLate changed the merges"
    del theirs["model"]["vocab"], theirs["model"]["merges"]
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(theirs, f, indent=1, ensure_ascii=False)
    safetensors.torch.save_file(golden, os.path.join(folder, "golden.safetensors"))
    record = {
        "queries": QUERIES,
        "documents": DOCUMENTS,
        "colbert_arguments": kwargs,
        "changed_before_saving": changes,
        "tiny_config": TINY,
        "files": {"model.safetensors": sha256(os.path.join(saved, "model.safetensors"))},
        "token_ids": token_ids,
        "tokenizer.json": "model.vocab and model.merges removed; they are the real tokenizer's",
        "versions": {
            "pylate": pylate.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "machine": machine_facts(),
    }
    with open(os.path.join(folder, "golden.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "tokenizer", help="folder with the real ModernBERT tokenizer, e.g. ../shared/data/modernbert-base"
    )
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    for name, (seed, kwargs, changes) in SETTINGS.items():
        with tempfile.TemporaryDirectory() as work:
            saved = build(args.tokenizer, seed, kwargs, changes, work)
            model, golden = goldens(saved)
            token_ids = {  # what PyLate's loaded model uses: its prefix ids, skip-list ids and expansion (pad) id
                "query_prefix": model.query_prefix_id,
                "document_prefix": model.document_prefix_id,
                "skiplist": sorted(set(model.skiplist)),
                "expansion": model.tokenizer.pad_token_id,
            }
            folder = write_fixture(saved, args.tokenizer, name, kwargs, changes, golden, token_ids)
        clamped = (golden["rerank_scores"] - golden["scores"].gather(1, golden["rerank_ids"])).abs().max()
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
        print(
            f"{name}: query_prefix={model.query_prefix!r} document_prefix={model.document_prefix!r} "
            f"query_length={model.query_length} document_length={model.document_length} "
            f"expansion={model.do_query_expansion} attended={model.attend_to_expansion_tokens} "
            f"skiplist={len(model.skiplist)} modules={len(model)}; rerank vs alone: {clamped:.2e}; {size // 1024} KB"
        )


if __name__ == "__main__":
    main()
