"""embed.py's ColBERT (late interaction) path against PyLate, through golden files PyLate itself wrote.

PyLate cannot share this environment (it pins sentence-transformers 5.3 and transformers <= 5.3), so
tools/make_pylate_goldens.py runs it in its own, on random-weight ModernBERT ColBERT folders that PyLate saves, and
keeps the folders and PyLate's outputs under fixtures/colbert_*/ (golden.json says how and with what). Each
setting is compared on every token id, vector and score, in fp32, to 1e-5; wrong variants must fail the same
comparison. PyLate is not needed here; the real tokenizer is (../shared/data/modernbert-base).
"""

import gzip
import hashlib
import json
import os
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

# ----------------------------------------------------------------------------------------------------
# ColBERT (late interaction) against PyLate's golden files. The folders are PyLate's, with two files made small
# (tools/make_pylate_goldens.py): model.safetensors gzipped, and tokenizer.json without the real tokenizer's
# vocabulary and merges, which colbert_folder puts back from ../shared.

COLBERT_ROOT = Path(__file__).resolve().parent
COLBERT_FIXTURES = COLBERT_ROOT / "fixtures"
COLBERT_SETTINGS = sorted(p.name for p in COLBERT_FIXTURES.glob("colbert_*") if (p / "golden.json").is_file())
COLBERT_TOKENIZER = (
    Path(os.environ.get("MODERNBERT_SHARED_DATA", COLBERT_ROOT.parent / "shared" / "data")) / "modernbert-base"
)
COLBERT_TOL = 1e-5
needs_colbert_tokenizer = pytest.mark.skipif(
    not (COLBERT_TOKENIZER / "tokenizer.json").is_file(),
    reason=f"the real tokenizer is not in {COLBERT_TOKENIZER}: put ../shared beside the checkout, or set "
    "MODERNBERT_SHARED_DATA to the folder that holds modernbert-base/",
)


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
    real = json.loads((COLBERT_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["model"] |= {"vocab": real["model"]["vocab"], "merges": real["model"]["merges"]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    return meta


COLBERT_CASES = {}  # setting -> its case, made once a session (the wrong variants ask for the settings in turn)


@pytest.fixture(scope="session", params=COLBERT_SETTINGS)
def colbert_case(request, tmp_path_factory):
    """One setting: its unpacked folder, PyLate's outputs (golden), its texts and arguments (meta), our model."""
    if not (COLBERT_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(needs_colbert_tokenizer.kwargs["reason"])
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


@needs_colbert_tokenizer
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


@needs_colbert_tokenizer
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


@needs_colbert_tokenizer
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


@needs_colbert_tokenizer
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


# ----------------------------------------------------------------------------------------------------
# What a ColBERT folder may say that this loader cannot honour: a one-line error naming it.


@pytest.fixture(scope="session")
def colbert_folder(tmp_path_factory):
    """colbert_expansion unpacked once, for copies with one file changed."""
    if not (COLBERT_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(needs_colbert_tokenizer.kwargs["reason"])
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
# `python embed.py colbert`: the documents ranked by MaxSim, as `rerank` prints them.


def colbert_cli_lines(out):
    """`score  index  text` lines -> [(score, index, text)]."""
    return [(float(s), int(i), t) for s, i, t in (line.split("  ", 2) for line in out.splitlines())]


@needs_colbert_tokenizer
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
@needs_colbert_tokenizer
def test_colbert_cli_in_a_subprocess_reads_standard_input(colbert_folder):
    """`python embed.py colbert --model F --query Q` with the documents on standard input, as a user runs it."""
    meta = json.loads((COLBERT_FIXTURES / "colbert_expansion" / "golden.json").read_text())
    query, documents = meta["queries"][1], meta["documents"]
    command = [
        sys.executable,
        str(COLBERT_ROOT / "embed.py"),
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
@needs_colbert_tokenizer
def test_colbert_recipe_runs_as_printed(tmp_path):
    """The recipe, in a shell, from a checkout's root with ../shared beside it (links to ours)."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("embed.py", "load.py", "modernbert.py"):
        (root / name).symlink_to(COLBERT_ROOT / name)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "modernbert-base").symlink_to(COLBERT_TOKENIZER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    p = subprocess.run(["bash", "-c", COLBERT_RECIPE], cwd=root, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = colbert_cli_lines(p.stdout)
    assert [i for _, i, _ in lines] in ([0, 1], [1, 0]), p.stdout  # the two documents, best first
    assert lines[0][0] >= lines[1][0], p.stdout
    model = embed.load_colbert(root / "tiny")
    assert (model.query_length, model.document_length, model.dimension) == (32, 180, 16)
    assert model.encode("What is ModernBERT?").shape == (32, 16)  # [MASK]-expanded to query_length
