"""Sentence embeddings and reranker scores from ModernBERT-family checkpoints, as Sentence Transformers computes them.

Most ModernBERT checkpoints people download are embedding models (nomic-ai/modernbert-embed-base,
Alibaba-NLP/gte-modernbert-base, ...) or rerankers (Alibaba-NLP/gte-reranker-modernbert-base). How to turn
token states into one vector, which prompt to put before a query, whether to normalise, which activation
turns a reranker's logit into a score: all of it is written in the checkpoint's Sentence Transformers files,
and read here, in both formats, the one on the hub today and the one sentence-transformers 6 writes:

    modules.json                        the pipeline: Transformer -> Pooling -> [Dense] -> [Normalize]
    1_Pooling/config.json               "pooling_mode": "cls" (6) or "pooling_mode_cls_token": true ... (hub)
    2_Dense/config.json + .safetensors  a linear layer and its activation ("torch.nn.modules.activation.Tanh")
    sentence_bert_config.json           max_seq_length (hub), the task ("feature-extraction" or a classifier)
    tokenizer_config.json               model_max_length: where sentence-transformers 6 keeps max_seq_length
    config_sentence_transformers.json   prompts, default_prompt_name, similarity_fn_name, truncate_dim,
                                        activation_fn (rerankers)

From Python:

    from embed import load_embedder, load_reranker
    embedder = load_embedder("nomic-ai/modernbert-embed-base")  # a hub id or a folder
    queries = embedder.encode_query(["What is ModernBERT?"])  # numpy (1, 768), after the checkpoint's "query" prompt
    documents = embedder.encode_document(["An encoder.", "A city."])  # (2, 768); convert_to_tensor=True: torch
    embedder.similarity(queries, documents)  # (1, 2): cosine, unless the checkpoint says otherwise
    reranker = load_reranker("Alibaba-NLP/gte-reranker-modernbert-base")
    reranker.rank("What is ModernBERT?", ["An encoder.", "A city."])  # [{"corpus_id": 0, "score": ...}, ...]

ColBERT (late-interaction) models keep one vector per token and score by MaxSim; their folders are PyLate's,
and load_colbert computes what PyLate computes (see "Late interaction" below):

    from embed import load_colbert
    colbert = load_colbert("lightonai/GTE-ModernColBERT-v1")
    queries = colbert.encode(["What is ModernBERT?"], is_query=True)  # [numpy (32, 128)]: padded with [MASK]
    documents = colbert.encode(["An encoder.", "A city."], is_query=False)  # [(5, 128), (5, 128)]
    colbert.similarity(queries, documents)  # (1, 2): MaxSim
    colbert.rank("What is ModernBERT?", ["An encoder.", "A city."])  # as reranker.rank

How it runs fast: all texts are tokenized first, sorted by length and cut into batches by a token budget,
and each batch runs packed: the texts back to back as input_ids (1, T) with their boundaries in cu_seqlens, so
no padding is ever computed (Sentence Transformers pads each batch of 32 texts to its longest). The rows come
back in input order. Unlike fill-mask, this path truncates, as Sentence Transformers does: a text longer than
max_seq_length tokens loses its end.

The command line (texts as arguments, or one per line from --input FILE, or from standard input):

    python embed.py embed --model M [--prompt-name query] [--input FILE|-] [--output FILE.safetensors|.npy] [TEXT ...]
    python embed.py rerank --model M --query Q [--top-k K] [--input FILE|-] [DOC ...]
    python embed.py colbert --model M --query Q [--top-k K] [--input FILE|-] [DOC ...]

Builds on load.py (checkpoint folders, tokenizers; load.py never imports this file) and depends on what it
depends on (and tqdm, for the progress bar); never on transformers or sentence-transformers, which the tests
compare against (nor on pylate).
"""

import argparse
import importlib
import json
import os
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from load import load_tokenizer, read_json, resolve, shown
from modernbert import (
    DTYPES,
    LIBRARY_FILES,
    ModernBertForSequenceClassification,
    ModernBertModel,
    Packing,
    cu_seqlens_from_lengths,
    parse_dtype,
    pick_device,
    users_line,
)

LIBRARY_FILES.add(__file__)  # warnings point past this file too, at the line that called load_embedder

# Sentence Transformers' pooling modes, in the order its older config keys concatenate them.
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
POOLING_MODES = tuple(LEGACY_POOLING_KEYS.values())
MODULES = ("Transformer", "Pooling", "Dense", "Normalize")  # the module types read here (from modules.json)
SIMILARITIES = {  # as sentence_transformers.util computes them: a (N, D), b (M, D) -> (N, M)
    "cosine": lambda a, b: F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T,
    "dot": lambda a, b: a @ b.T,
    "euclidean": lambda a, b: -torch.cdist(a, b, p=2.0),
    "manhattan": lambda a, b: -torch.cdist(a, b, p=1.0),
}
NO_LIMIT = int(1e30)  # transformers' model_max_length when tokenizer_config.json gives none
BATCH_TOKENS = 16384  # the default token budget of one packed batch

# ----------------------------------------------------------------------------------------------------
# Reading Sentence Transformers' files


def read_modules(folder, model_type):
    """modules.json as [(type, path)], each type one of MODULES, checked against what the checkpoint is
    (config_sentence_transformers.json's model_type: "SentenceTransformer" when not written, or
    "CrossEncoder"). [] when the folder has no modules.json: a plain transformers checkpoint, whatever
    else it has, as Sentence Transformers reads it."""
    entries = read_json(folder, "modules.json")  # {} when there is none
    written = read_json(folder, "config_sentence_transformers.json").get("model_type", "SentenceTransformer")
    if entries and written != model_type:
        use = {
            "SentenceTransformer": "load_embedder, or on the command line `python embed.py embed`",
            "CrossEncoder": "load_reranker, or on the command line `python embed.py rerank`",
            "ColBERT": "load_colbert, or on the command line `python embed.py colbert`",
        }
        hint = f": load it with {use[written]}" if written in use else ", which this loader does not run"
        raise ValueError(f"{folder!r} holds a {written} (config_sentence_transformers.json){hint}.")
    modules = []
    for entry in entries:
        kind = entry["type"].rsplit(".", 1)[-1]
        if not entry["type"].startswith("sentence_transformers.") or kind not in MODULES:
            raise module_not_run(folder, entry, f"Sentence Transformers' {', '.join(MODULES)}")
        modules.append((kind, module_folder(folder, entry)))
    if (modules and modules[0][0] != "Transformer") or any(kind == "Transformer" for kind, _ in modules[1:]):
        raise ValueError(f"modules.json in {folder!r}: the first module, and only it, must be the Transformer.")
    return modules


def module_not_run(folder, entry, runs):
    return ValueError(
        f"modules.json in {folder!r}: module {entry.get('name')!r} has type {entry['type']!r}, which "
        f"this loader does not run (it runs {runs})."
    )


def module_folder(folder, entry):
    """A modules.json entry's path, which must stay inside the checkpoint's folder."""
    path = os.path.normpath(entry.get("path") or ".")
    if os.path.isabs(path) or path.startswith(".."):
        raise ValueError(f"modules.json in {folder!r}: module path {entry['path']!r} leaves the folder.")
    return path


def transformer_settings(folder, task, model_config):
    """What Sentence Transformers' Transformer module does before the model: (max_seq_length, lowercase).
    Its sentence_bert_config.json (either format) must be for `task`; the length is, as it computes it:
    processor_kwargs' model_max_length, else the older files' max_seq_length, else tokenizer_config.json's
    model_max_length capped at the model's max_position_embeddings."""
    st = read_json(folder, "sentence_bert_config.json")
    if st.get("transformer_task", task) != task:  # older files name no task
        raise ValueError(
            f"sentence_bert_config.json in {folder!r} is for the task {st['transformer_task']!r}, not {task!r}."
        )
    processor = st.get("processor_kwargs", st.get("tokenizer_args")) or {}
    unsupported = {k: v for k, v in st.items() if k in ("processing_kwargs", "query_expansion") and v}
    unsupported |= {k: v for k, v in st.items() if k in ("query_length", "document_length") and v is not None}
    if unsupported:
        raise ValueError(
            f"sentence_bert_config.json in {folder!r} sets {unsupported}, which this loader does not run."
        )
    if "model_max_length" in processor:
        length = processor["model_max_length"]
    elif st.get("max_seq_length") is not None:
        length = st["max_seq_length"]
    else:
        written = read_json(folder, "tokenizer_config.json").get("model_max_length", NO_LIMIT)
        length = min(written, model_config.max_position_embeddings)
    return int(length), bool(st.get("do_lower_case", False))


def read_pooling(folder, dimension):
    """1_Pooling/config.json in either format -> (modes, include_prompt). Sentence-transformers 6 writes
    "pooling_mode" ("cls", or a list of modes to concatenate) and "embedding_dimension"; the hub's older files
    have one boolean per mode ("pooling_mode_mean_tokens": true; none true means mean) and
    "word_embedding_dimension"."""
    config = read_json(folder, "config.json")
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if bad := [mode for mode in modes if mode not in POOLING_MODES]:
        raise ValueError(
            f"{folder}/config.json: unknown pooling mode {bad[0]!r}; Sentence Transformers has {POOLING_MODES}."
        )
    written = config.get("embedding_dimension", config.get("word_embedding_dimension", dimension))
    if written != dimension:
        raise ValueError(f"{folder}/config.json pools {written}-dimensional tokens, but the model's are {dimension}.")
    return tuple(modes), bool(config.get("include_prompt", True))


def torch_module(path, where):
    """An activation named by its class path ("torch.nn.modules.activation.Tanh"), made with no arguments.
    Only torch.nn modules: Sentence Transformers too runs nothing else without trust_remote_code."""
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None) if path.startswith("torch.") else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{where}: activation {path!r} is not a torch.nn module, the only kind this loader runs.")
    return cls()


class Dense(nn.Module):
    """Sentence Transformers' Dense: activation(linear(x)), plus x (projected if the sizes differ) with
    use_residual. Its weights are linear.weight, linear.bias (and residual.weight) in model.safetensors."""

    def __init__(self, folder):
        super().__init__()
        config = read_json(folder, "config.json")
        for key in ("module_input_name", "module_output_name"):
            if config.get(key, "sentence_embedding") != "sentence_embedding":
                raise ValueError(f"{folder}/config.json: a Dense on {config[key]!r} (token-level) is not supported.")
        n_in, n_out = config["in_features"], config["out_features"]
        self.linear = nn.Linear(n_in, n_out, bias=config.get("bias", True))
        self.activation = torch_module(config.get("activation_function", "torch.nn.modules.activation.Tanh"), folder)
        self.use_residual = config.get("use_residual", False)
        if self.use_residual and n_in != n_out:
            self.residual = nn.Linear(n_in, n_out, bias=False)
        self.load_state_dict(read_weights(folder))  # strict: every key, every shape

    def forward(self, x):
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (self.residual(x) if hasattr(self, "residual") else x)
        return out


def read_weights(folder):
    from safetensors.torch import load_file

    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} has no model.safetensors (pickled weights are never opened).")
    return load_file(path)


class Normalize(nn.Module):
    def __init__(self, folder):
        super().__init__()
        config = read_json(folder, "config.json")  # older saves write no config, or no folder at all
        if config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
            raise ValueError(f"{folder}/config.json: a Normalize on {config['module_input_name']!r} is not supported.")

    def forward(self, x):
        return F.normalize(x, p=2, dim=-1)


# ----------------------------------------------------------------------------------------------------
# Pooling and packed batches


def pool(hidden, packing, modes, skip=0):
    """Token states of N texts back to back, hidden (T, H) laid out as `packing` (the model's Packing) says,
    -> one vector per text (N, len(modes) * H), as Sentence Transformers' Pooling computes it on a right-padded
    batch. skip: the prompt's leading tokens ([CLS] included) that include_prompt=False leaves out.

        cls        the first token kept ([CLS]; with skip, the first after the prompt)
        lasttoken  the last token ([SEP])
        max        the elementwise max over the kept tokens
        mean, mean_sqrt_len_tokens, weightedmean
                   the sum of the kept tokens over n, over sqrt(n), or weighted by position + 1 over the weights
    A text with no token kept (truncated inside its prompt) gets what Sentence Transformers gives it: its
    first token for cls, -inf for max, zeros otherwise."""
    cu = packing.cu_seqlens.long()
    starts, lengths = cu[:-1], cu.diff()
    N, H = lengths.shape[0], hidden.shape[1]
    seq, position = packing.seq_ids, packing.positions  # (T,) each token's text and its place inside it
    kept = position >= skip  # (T,)
    any_kept = lengths > skip  # (N,)
    x, s = hidden[kept], seq[kept]  # (T_kept, H), (T_kept,)
    acc = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype  # as theirs
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[starts + torch.where(any_kept, skip, 0)])
        elif mode == "lasttoken":
            out.append(hidden[cu[1:] - 1] * any_kept[:, None])
        elif mode == "max":
            out.append(hidden.new_full((N, H), float("-inf")).scatter_reduce_(0, s[:, None].expand_as(x), x, "amax"))
        else:
            weight = (position[kept] + 1 if mode == "weightedmean" else torch.ones_like(s)).to(acc)  # (T_kept,)
            sums = torch.zeros(N, H, dtype=acc, device=x.device).index_add_(0, s, x.to(acc) * weight[:, None])
            count = torch.zeros(N, dtype=acc, device=x.device).index_add_(0, s, weight).clamp(min=1e-9)
            out.append((sums / (count.sqrt() if mode == "mean_sqrt_len_tokens" else count)[:, None]).to(hidden.dtype))
    return torch.cat(out, dim=-1)


def token_batches(lengths, batch_tokens, batch_size=None):
    """Indices of the texts, longest first, cut into batches of at most batch_tokens tokens (a longer text
    alone) and at most batch_size texts."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current, tokens = [], [], 0
    for i in order:
        if current and (tokens + lengths[i] > batch_tokens or len(current) == batch_size):
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    return batches + [current] if current else batches


@torch.inference_mode()
def run_packed(forward, encodings, device, batch_tokens, batch_size, show_progress_bar, what):
    """forward(input_ids (1, T), cu_seqlens (N + 1,)) -> (N, ...) on each packed batch; the rows, in input order."""
    lengths = [len(e.ids) for e in encodings]
    batches = token_batches(lengths, batch_tokens, batch_size)
    if show_progress_bar is None:  # on long inputs, in a terminal
        show_progress_bar = len(batches) > 1 and sys.stderr.isatty()
    progress = None
    if show_progress_bar:
        from tqdm import tqdm  # comes with huggingface_hub

        progress = tqdm(total=len(encodings), desc=what, unit=" texts", file=sys.stderr)
    rows, order = [], []
    for batch in batches:
        ids = torch.tensor([t for i in batch for t in encodings[i].ids], device=device)[None]  # (1, T)
        cu = cu_seqlens_from_lengths(torch.tensor([lengths[i] for i in batch], device=device))
        rows.append(forward(ids, cu))
        order += batch
        if progress is not None:
            progress.update(len(batch))
    if progress is not None:
        progress.close()
    return torch.cat(rows)[torch.tensor(order).argsort().to(device)]


def checkpoint_tokenizer(folder, max_seq_length, lowercase):
    """load.py's tokenizer of the folder, truncating as Sentence Transformers does (longest_first: a pair
    loses tokens from its longer text first) and padding nothing."""
    tokenizer = load_tokenizer(folder)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_seq_length, strategy="longest_first")
    if lowercase:  # do_lower_case: a Lowercase normalizer first, as Sentence Transformers adds it
        from tokenizers import normalizers

        rest = [tokenizer.normalizer] if tokenizer.normalizer is not None else []
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), *rest])
    return tokenizer


class Pipeline:
    """What Embedder and Reranker share: the tokenizer, which truncates at max_seq_length, and the prompts."""

    @property
    def max_seq_length(self):
        """Tokens kept of a text (a pair, for a reranker), special tokens included; settable."""
        return self.tokenizer.truncation["max_length"]

    @max_seq_length.setter
    def max_seq_length(self, value):
        self.tokenizer.enable_truncation(value, strategy="longest_first")

    def resolve_prompt(self, prompt, prompt_name):
        """As Sentence Transformers resolves it: an explicit prompt wins, then prompt_name (a key of
        config_sentence_transformers.json's prompts), then default_prompt_name."""
        if prompt is None and prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"No prompt named {prompt_name!r}: this checkpoint's prompts are {self.prompts}.")
            return self.prompts[prompt_name]
        if prompt is None and self.default_prompt_name is not None:
            return self.prompts.get(self.default_prompt_name)
        return prompt

    def read_prompts(self, config, defaults):
        self.prompts = {**defaults, **{k: v for k, v in config.get("prompts", {}).items() if v is not None}}
        self.default_prompt_name = config.get("default_prompt_name")
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise ValueError(
                f"default_prompt_name {self.default_prompt_name!r} is not one of the prompts {self.prompts}."
            )


def texts_list(texts, what="texts"):
    """A list of str; a single str is one text. Anything else is a TypeError naming it."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what} must be strings; item {i} is a {type(text).__name__}.")
    return texts


def returned(rows, convert_to_numpy, convert_to_tensor, single=False):
    """Rows (N, ...) as Sentence Transformers returns them, with its defaults (convert_to_numpy=True,
    convert_to_tensor=False): a tensor with convert_to_tensor (it wins), else a numpy array on the CPU (bf16 as
    float32, which numpy lacks), else a list of tensors; the first row alone for a single input."""
    if convert_to_tensor:
        out = rows
    elif convert_to_numpy:
        out = (rows.float() if rows.dtype == torch.bfloat16 else rows).cpu().numpy()
    else:
        out = list(rows)
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------------
# Embeddings


def load_embedder(name_or_folder, device=None, dtype=None, revision=None):
    """Sentence embeddings as Sentence Transformers computes them: an Embedder (encode, encode_query,
    encode_document, similarity), from a folder or hub id with or without Sentence Transformers' files.
    `device`, `dtype` ("bf16" or a torch dtype) and `revision` as load.load_model takes them."""
    return Embedder.load(name_or_folder, device=device, dtype=dtype, revision=revision)


class Embedder(Pipeline):
    """A ModernBERT encoder with Sentence Transformers' modules: Pooling, then Dense and Normalize as the
    checkpoint has them. Make it with load_embedder."""

    @classmethod
    def load(cls, name_or_folder, device=None, dtype=None, revision=None):
        """A folder or hub id with Sentence Transformers' files, in either format; without them (a plain
        transformers checkpoint) tokens are pooled as config.json's classifier_pooling says ("cls" or
        "mean"), and a warning says so."""
        folder = resolve(name_or_folder, revision)
        modules = read_modules(folder, "SentenceTransformer")
        kinds = [kind for kind, _ in modules]
        if kinds and (kinds[1:2] != ["Pooling"] or not set(kinds[2:]) <= {"Dense", "Normalize"}):
            raise ValueError(
                f"modules.json in {folder!r} has {kinds}: an embedder here is a Transformer, a "
                "Pooling, then any Dense and Normalize modules."
            )
        config = read_json(folder, "config_sentence_transformers.json")
        root = os.path.join(folder, modules[0][1]) if modules else folder
        model = ModernBertModel.from_pretrained(root, dtype=dtype, device=device)
        self = cls()
        self.model, self.folder = model, folder
        max_seq_length, lowercase = transformer_settings(root, "feature-extraction", model.config)
        self.tokenizer = checkpoint_tokenizer(root, max_seq_length, lowercase)
        self.special_ids = {self.tokenizer.token_to_id(t) for t in self.tokenizer.special_tokens_map.values()}
        if modules:
            self.modes, self.include_prompt = read_pooling(
                os.path.join(folder, modules[1][1]), model.config.hidden_size
            )
        else:
            self.modes, self.include_prompt = (model.config.classifier_pooling,), True
            warnings.warn(
                f"{folder!r} has no Sentence Transformers files (modules.json): its tokens are pooled as "
                f"config.json's classifier_pooling says ({model.config.classifier_pooling!r}), with no prompt and "
                "no normalisation.",
                stacklevel=users_line(),
            )
        after = [
            {"Dense": Dense, "Normalize": Normalize}[kind](os.path.join(folder, path)) for kind, path in modules[2:]
        ]
        self.modules = nn.Sequential(*after)
        self.modules.to(device=model.device, dtype=model.dtype)
        self.read_prompts(config, {"query": "", "document": ""})  # Sentence Transformers' default prompts
        self.similarity_fn_name = config.get("similarity_fn_name") or "cosine"
        if self.similarity_fn_name not in SIMILARITIES:
            raise ValueError(f"similarity_fn_name {self.similarity_fn_name!r} is not one of {sorted(SIMILARITIES)}.")
        self.truncate_dim = config.get("truncate_dim")
        return self

    def encode(
        self,
        texts,
        prompt_name=None,
        prompt=None,
        batch_size=None,
        show_progress_bar=None,
        *,
        convert_to_numpy=True,
        convert_to_tensor=False,
        normalize_embeddings=None,
        batch_tokens=BATCH_TOKENS,
    ):
        """One embedding per text, (N, dim), or (dim,) for a single str, as Sentence Transformers' encode
        computes and returns it: a numpy array by default, a tensor with convert_to_tensor=True, a list of
        tensors with neither (see `returned`). The prompt (see resolve_prompt) goes before every text. Texts
        longer than max_seq_length tokens are truncated. Batches hold at most batch_tokens tokens (and at most
        batch_size texts, if given); normalize_embeddings=True L2-normalises the rows (the checkpoint's own
        Normalize module, if it has one, always runs)."""
        single = isinstance(texts, str)
        texts = texts_list(texts)
        prompt = self.resolve_prompt(prompt, prompt_name)
        skip = 0
        if prompt:
            if not self.include_prompt:  # the prompt's tokens but a trailing [SEP] are left out of the pooling
                ids = self.tokenizer.encode(prompt).ids
                skip = len(ids) - (ids[-1] in self.special_ids)
            texts = [prompt + text for text in texts]
        if not texts:
            empty = torch.empty(0, self.dimension, device=self.model.device, dtype=self.model.dtype)
            return returned(empty, convert_to_numpy, convert_to_tensor)

        def forward(input_ids, cu_seqlens):
            hidden, packing, _ = self.model.encode(input_ids, cu_seqlens=cu_seqlens)
            return self.modules(pool(hidden, packing, self.modes, skip))

        encodings = self.tokenizer.encode_batch(texts)
        out = run_packed(
            forward, encodings, self.model.device, batch_tokens, batch_size, show_progress_bar, "Embedding"
        )
        if self.truncate_dim is not None:
            out = out[:, : self.truncate_dim]
        if normalize_embeddings:
            out = F.normalize(out, p=2, dim=-1)
        return returned(out, convert_to_numpy, convert_to_tensor, single)

    def encode_query(self, texts, prompt_name=None, prompt=None, **kwargs):
        """encode with the checkpoint's "query" prompt (empty if it has none), unless a prompt is given."""
        if prompt_name is None and prompt is None and "query" in self.prompts:
            prompt_name = "query"
        return self.encode(texts, prompt_name=prompt_name, prompt=prompt, **kwargs)

    def encode_document(self, texts, prompt_name=None, prompt=None, **kwargs):
        """encode with the checkpoint's "document" prompt, else its "passage" or "corpus" one: the first of
        them it has (every checkpoint has "document", empty if it wrote none, as in Sentence Transformers)."""
        if prompt_name is None and prompt is None:
            prompt_name = next((name for name in ("document", "passage", "corpus") if name in self.prompts), None)
        return self.encode(texts, prompt_name=prompt_name, prompt=prompt, **kwargs)

    def similarity(self, a, b):
        """(N, M) scores of every row of a against every row of b (1-D inputs count as one row), with the
        checkpoint's similarity_fn_name: cosine (the default), dot, or euclidean / manhattan (negative
        distances), as Sentence Transformers computes them."""
        a, b = (torch.atleast_2d(torch.as_tensor(x)) for x in (a, b))
        a, b = (x.float() if torch.finfo(x.dtype).bits < 32 else x for x in (a, b))  # as theirs: no fp16 ties
        return SIMILARITIES[self.similarity_fn_name](a, b)

    @property
    def dimension(self):
        """The length of one embedding."""
        dim = len(self.modes) * self.model.config.hidden_size
        dim = next((m.linear.out_features for m in reversed(self.modules) if isinstance(m, Dense)), dim)
        return dim if self.truncate_dim is None else min(dim, self.truncate_dim)


# ----------------------------------------------------------------------------------------------------
# Rerankers


def load_reranker(name_or_folder, device=None, dtype=None, revision=None):
    """Reranker scores as Sentence Transformers' CrossEncoder computes them: a Reranker (predict, rank), from a
    folder or hub id holding a sequence classifier, with or without Sentence Transformers' files."""
    return Reranker.load(name_or_folder, device=device, dtype=dtype, revision=revision)


class Reranker(Pipeline):
    """A ModernBERT sequence classifier scoring (query, document) pairs, as Sentence Transformers'
    CrossEncoder does. Make it with load_reranker."""

    @classmethod
    def load(cls, name_or_folder, device=None, dtype=None, revision=None):
        """A folder or hub id holding a ModernBertForSequenceClassification checkpoint (a classifier head
        included), with or without Sentence Transformers' files."""
        folder = resolve(name_or_folder, revision)
        modules = read_modules(folder, "CrossEncoder")
        if [kind for kind, _ in modules] not in ([], ["Transformer"]):
            raise ValueError(f"modules.json in {folder!r}: a reranker here is a Transformer module alone.")
        root = os.path.join(folder, modules[0][1]) if modules else folder
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a missing classifier is an error below, not a warning
            model = ModernBertForSequenceClassification.from_pretrained(root, dtype=dtype, device=device)
        if model.load_report["initialised"]:
            raise ValueError(
                f"{folder!r} is not a reranker: its weights have no classifier head "
                f"({', '.join(model.load_report['initialised'])}). Use a sequence-classification checkpoint."
            )
        self = cls()
        self.model, self.folder = model, folder
        max_seq_length, lowercase = transformer_settings(root, "sequence-classification", model.config)
        self.tokenizer = checkpoint_tokenizer(root, max_seq_length, lowercase)
        config = read_json(folder, "config_sentence_transformers.json") if modules else {}
        self.read_prompts(config, {})
        self.activation_fn = self.read_activation(config, read_json(root, "config.json"), model.config.num_labels)
        return self

    @staticmethod
    def read_activation(st_config, config, num_labels):
        """CrossEncoder's activation, from the first place that names one: config_sentence_transformers.json's
        activation_fn (read only with a modules.json, as CrossEncoder does), config.json's
        sentence_transformers.activation_fn, or its older sbert_ce_default_activation_function; else Sigmoid
        for one label, Identity for more."""
        written = st_config.get("activation_fn")
        written = written or (config.get("sentence_transformers") or {}).get("activation_fn")
        written = written or config.get("sbert_ce_default_activation_function")
        if written:
            return torch_module(written, "the reranker's activation_fn")
        return nn.Sigmoid() if num_labels == 1 else nn.Identity()

    @property
    def num_labels(self):
        return self.model.config.num_labels

    def predict(
        self,
        pairs,
        prompt_name=None,
        prompt=None,
        batch_size=None,
        show_progress_bar=None,
        *,
        convert_to_numpy=True,
        convert_to_tensor=False,
        batch_tokens=BATCH_TOKENS,
    ):
        """Scores of (query, document) pairs, after the checkpoint's activation (sigmoid for one label when
        it names none): (N,) for one label, (N, num_labels) for more, one score (or row) for a single pair;
        returned as CrossEncoder.predict returns them: numpy by default, a tensor with convert_to_tensor=True,
        a list with neither (see `returned`). Each pair is tokenized as one sequence, [CLS] query [SEP] document
        [SEP] (the tokenizer's own template), and truncated to max_seq_length tokens by cutting the longer
        text first."""
        pairs = pairs if isinstance(pairs, (list, tuple)) else list(pairs)
        single = len(pairs) == 2 and all(isinstance(p, str) for p in pairs)  # one pair, as CrossEncoder reads it
        pairs = [pairs] if single else list(pairs)
        for i, pair in enumerate(pairs):
            if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
                raise TypeError(f"pairs must be (query, document) pairs of strings; item {i} is {pair!r}.")
        prompt = self.resolve_prompt(prompt, prompt_name)
        if not pairs:
            return returned(torch.empty(0, device=self.model.device), convert_to_numpy, convert_to_tensor)
        encodings = self.tokenizer.encode_batch([((prompt or "") + a, b) for a, b in pairs])

        def forward(input_ids, cu_seqlens):
            logits = self.model(input_ids, cu_seqlens=cu_seqlens).logits.float()  # (N, num_labels), fp32 as theirs
            scores = self.activation_fn(logits)
            return scores.squeeze(-1) if self.num_labels == 1 else scores

        out = run_packed(forward, encodings, self.model.device, batch_tokens, batch_size, show_progress_bar, "Scoring")
        return returned(out, convert_to_numpy, convert_to_tensor, single)

    def rank(self, query, documents, top_k=None, return_documents=False, **kwargs):
        """The documents best first, as CrossEncoder.rank: [{"corpus_id": index in documents, "score": ...}],
        with "text" too if return_documents; top_k keeps the first k. Needs a one-label reranker."""
        if self.num_labels != 1:
            raise ValueError(f"rank needs a reranker with one label; this one has {self.num_labels}: use predict.")
        documents = texts_list(documents, "documents")
        scores = self.predict([(query, d) for d in documents], convert_to_tensor=True, **kwargs).tolist()
        results = [
            {"corpus_id": i, "score": s} | ({"text": documents[i]} if return_documents else {})
            for i, s in enumerate(scores)
        ]
        return sorted(results, key=lambda r: r["score"], reverse=True)[:top_k]


# ----------------------------------------------------------------------------------------------------
# Late interaction (ColBERT), as PyLate computes it
#
# A ColBERT model keeps one vector per token instead of pooling them, and scores a query against a document
# by MaxSim: each query vector's best dot product with the document's vectors, summed over the query's vectors.
# PyLate's folder is a Transformer module and one or more Dense modules, run on every token, with its own
# settings in config_sentence_transformers.json. Queries and documents are encoded differently:
#
#   query     [CLS] [Q] what is it ? [SEP] [MASK] [MASK] ... [MASK]    query_length tokens, every one kept
#                                          '-- expansion: each sees the real tokens, and no real token
#                                              sees them unless attend_to_expansion_tokens
#   document  [CLS] [D] it is an encoder . [SEP]                       at most document_length tokens; the
#                                                                      skip-list's (".") dropped after encoding
#
# The prefix is a token put after [CLS] ("" for none), not text; texts are stripped of surrounding whitespace
# (Sentence Transformers 5, which PyLate runs on, does so), then truncated to leave room for the prefix.

# PyLate's defaults, for what config_sentence_transformers.json does not say.
COLBERT_DEFAULTS = {
    "query_prefix": "[Q] ",
    "document_prefix": "[D] ",
    "query_length": 32,
    "document_length": 180,
    "do_query_expansion": True,
    "attend_to_expansion_tokens": False,
    "skiplist_words": list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),  # string.punctuation
}
COLBERT_SETTING_TYPES = dict(zip(COLBERT_DEFAULTS, (str, str, int, int, bool, bool, list)))
TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}
# modules.json's types -> what runs them; PyLate keeps the Transformer and the Dense modules and drops the others
COLBERT_MODULES = {
    "sentence_transformers.models.Transformer": "Transformer",
    "pylate.models.Dense.Dense": "Dense",
    "sentence_transformers.models.Dense": "Dense",  # run on every token, as PyLate's own Dense
    "sentence_transformers.models.Normalize": None,  # dropped: encode normalises unless told not to
}


def load_colbert(name_or_folder, device=None, dtype=None, revision=None):
    """Token vectors and MaxSim scores as PyLate computes them: a ColBERT (encode(texts, is_query=...),
    similarity, rank), from a folder or hub id that PyLate saved (lightonai/GTE-ModernColBERT-v1, ...)."""
    return ColBERT.load(name_or_folder, device=device, dtype=dtype, revision=revision)


def read_colbert_settings(folder):
    """config_sentence_transformers.json -> (PyLate's settings, each checked, its defaults for those not
    written; the whole file)."""
    config = read_json(folder, "config_sentence_transformers.json")
    where = f"config_sentence_transformers.json in {folder!r}"
    if config.get("model_type", "ColBERT") != "ColBERT":
        raise ValueError(f"{where} says it holds a {config['model_type']}, not a ColBERT: load it with load_embedder.")
    settings = {key: default if config.get(key) is None else config[key] for key, default in COLBERT_DEFAULTS.items()}
    for key, kind in COLBERT_SETTING_TYPES.items():
        if not isinstance(settings[key], kind) or (kind is int and isinstance(settings[key], bool)):
            raise ValueError(f"{where}: {key} is {settings[key]!r}, which is not {TYPE_NAMES[kind]}.")
    if bad := [word for word in settings["skiplist_words"] if not isinstance(word, str)]:
        raise ValueError(f"{where}: skiplist_words holds {bad[0]!r}, which is not a string.")
    if config.get("similarity_fn_name") not in (None, "MaxSim"):
        raise ValueError(f"{where}: similarity_fn_name {config['similarity_fn_name']!r}; PyLate's ColBERT has MaxSim.")
    if not settings["do_query_expansion"]:  # as PyLate: no expansion tokens to attend to
        settings["attend_to_expansion_tokens"] = False
    return settings, config


def read_colbert_modules(folder):
    """modules.json as [(kind, path)]: the Transformer, then one or more Dense modules."""
    modules = []
    for entry in read_json(folder, "modules.json"):
        if entry["type"] not in COLBERT_MODULES:
            raise module_not_run(folder, entry, ", ".join(COLBERT_MODULES))
        if COLBERT_MODULES[entry["type"]]:
            modules.append((COLBERT_MODULES[entry["type"]], module_folder(folder, entry)))
    kinds = [kind for kind, _ in modules]
    if kinds[:1] != ["Transformer"] or set(kinds[1:]) != {"Dense"}:
        raise ValueError(
            f"{folder!r} has modules {kinds} (modules.json): a ColBERT here is a Transformer, then Dense modules "
            "(PyLate would give a folder without a Dense an untrained one)."
        )
    return modules


def encode_with_unseen_tokens(model, input_ids, cu_seqlens, is_real):
    """model.encode on packed input (1, T) where the tokens with is_real (T,) False are computed like the others
    but are keys to none: each sees the real tokens of its sequence, no token sees it. transformers computes a
    padded position so, which PyLate keeps as a query's expansion. ModernBertModel.encode makes every token of
    cu_seqlens real, so its layers run here on a Packing that says which are not (keeps_padding: no kernel that
    would ignore is_real is picked)."""
    T, longest = input_ids.shape[1], int(cu_seqlens.diff().max())
    packing = Packing(
        torch.arange(T, device=input_ids.device), cu_seqlens, longest, (1, T), is_real, keeps_padding=True
    )
    return model.run_layers(model.embeddings(input_ids[0]), packing)[0]  # (T, hidden)


def colbert_scores(queries_embeddings, documents_embeddings):
    """MaxSim, (Q, D): for query i's matrix (n, dim) and document j's (m, dim), the sum over the query's vectors
    of each one's best dot product with the document's vectors. Lists of matrices (numpy or torch; a 3-D array
    counts as one). Equal to PyLate's colbert_scores on each pair alone. On a batch padded with zero vectors,
    as its rank.rerank pads the documents, PyLate scores a query vector's best match as 0 where it is negative,
    so that a document's score depends on the others given with it: here padding never reaches a score."""
    queries, documents = ([torch.as_tensor(m) for m in ms] for ms in (queries_embeddings, documents_embeddings))
    if not queries or not documents:
        return torch.zeros(len(queries), len(documents))
    device, dtype = queries[0].device, torch.promote_types(queries[0].dtype, torch.float32)  # no fp16 ties
    docs = torch.cat([d.to(device, dtype) for d in documents])  # (T, dim): the documents back to back
    lengths = torch.tensor([len(d) for d in documents], device=device)
    doc_of = torch.repeat_interleave(torch.arange(len(documents), device=device), lengths)  # (T,)
    scores = []
    for q in queries:
        sims = q.to(device, dtype) @ docs.T  # (n, T)
        best = sims.new_full((sims.shape[0], len(documents)), float("-inf"))  # (n, D)
        scores.append(best.scatter_reduce_(1, doc_of.expand_as(sims), sims, "amax").sum(dim=0))
    return torch.stack(scores)


def rerank(documents_ids, queries_embeddings, documents_embeddings):
    """PyLate's rank.rerank: for each query, its documents best first by MaxSim as [{"id": ..., "score": ...}],
    documents_ids[i] naming the documents of query i (the matrices documents_embeddings[i])."""
    results = []
    for ids, query, documents in zip(documents_ids, queries_embeddings, documents_embeddings):
        scores = colbert_scores([query], documents)[0].tolist()
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        results.append([{"id": ids[i], "score": scores[i]} for i in order])
    return results


class ColBERT(Pipeline):
    """A ModernBERT encoder with PyLate's Dense modules on every token, and its settings for queries and
    documents (query_prefix, query_length, ...: the names of config_sentence_transformers.json). Make it with
    load_colbert."""

    max_seq_length = None  # PyLate's two lengths take its place: query_length and document_length

    @classmethod
    def load(cls, name_or_folder, device=None, dtype=None, revision=None):
        """A folder or hub id that PyLate saved: modules.json (a Transformer, then Dense modules),
        config_sentence_transformers.json (its settings), the tokenizer holding the prefix tokens."""
        folder = resolve(name_or_folder, revision)
        settings, config = read_colbert_settings(folder)
        modules = read_colbert_modules(folder)
        root = os.path.join(folder, modules[0][1])
        model = ModernBertModel.from_pretrained(root, dtype=parse_dtype(dtype), device=device)
        self = cls()
        self.model, self.folder = model, folder
        for key, value in settings.items():
            setattr(self, key, value)
        width, dense = model.config.hidden_size, []
        for _, path in modules[1:]:  # each one's input: the tokens' width, then the Dense before it
            if (n_in := read_json(os.path.join(folder, path), "config.json").get("in_features")) != width:
                raise ValueError(
                    f"{path}/config.json in {folder!r}: in_features is {n_in}, but its input has {width}."
                )
            dense.append(Dense(os.path.join(folder, path)))
            width = dense[-1].linear.out_features
        self.dense = nn.Sequential(*dense).to(device=model.device, dtype=model.dtype)
        _, self.lowercase = transformer_settings(root, "feature-extraction", model.config)
        self.tokenizer = load_tokenizer(root)
        self.tokenizer.no_padding()
        self.read_prompts(config, {})
        self.query_prefix_id = self.token_id("query_prefix", self.query_prefix)
        self.document_prefix_id = self.token_id("document_prefix", self.document_prefix)
        self.skiplist = sorted({self.token_id("skiplist_words", word) for word in self.skiplist_words})
        # PyLate expands queries with the mask token, else the end-of-sequence one, else the padding one
        names = ("mask_token", "eos_token", "pad_token")
        expansion = next(
            (self.tokenizer.special_tokens_map[n] for n in names if n in self.tokenizer.special_tokens_map), None
        )
        if expansion is None:
            raise ValueError(f"The tokenizer in {root!r} has no mask, end or padding token to expand queries with.")
        self.expansion_id = self.tokenizer.token_to_id(expansion)
        specials = self.tokenizer.num_special_tokens_to_add(False)  # [CLS] and [SEP]
        for key, prefix in (("query_length", self.query_prefix_id), ("document_length", self.document_prefix_id)):
            if getattr(self, key) - (prefix is not None) < specials:
                raise ValueError(
                    f"config_sentence_transformers.json in {folder!r}: {key} {getattr(self, key)} leaves no room for "
                    f"the {specials} special tokens" + (" and the prefix." if prefix is not None else ".")
                )
        return self

    def token_id(self, setting, token):
        """The id of a prefix or a skip-list word, as PyLate's tokenizer gives it (convert_tokens_to_ids): one
        it does not have is the unknown token, but a prefix must be there (PyLate would add it untrained)."""
        if setting != "skiplist_words" and token == "":
            return None  # no prefix
        found = self.tokenizer.token_to_id(token)
        unknown = self.tokenizer.special_tokens_map.get("unk_token")
        if found is None and setting == "skiplist_words" and unknown is not None:
            found = self.tokenizer.token_to_id(unknown)
        if found is None or found >= self.model.config.vocab_size:
            raise ValueError(
                f"{setting} {token!r} (config_sentence_transformers.json) is not a token of {self.folder!r}'s "
                "tokenizer and model: PyLate would add it with an untrained embedding. Use a folder PyLate saved."
            )
        return found

    def tokenize(self, texts, is_query):
        """The ids PyLate's model reads for each text, and how many of them are real (the rest: expansion)."""
        length = self.query_length if is_query else self.document_length
        prefix = self.query_prefix_id if is_query else self.document_prefix_id
        self.tokenizer.enable_truncation(length - (prefix is not None), strategy="longest_first")
        texts = [text.strip().lower() if self.lowercase else text.strip() for text in texts]
        ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
        if prefix is not None:
            ids = [i[:1] + [prefix] + i[1:] for i in ids]  # after [CLS]
        real = [len(i) for i in ids]
        if is_query and self.do_query_expansion:
            ids = [i + [self.expansion_id] * (length - len(i)) for i in ids]
        return ids, real

    @torch.inference_mode()
    def encode(
        self,
        sentences,
        prompt_name=None,
        prompt=None,
        batch_size=None,
        show_progress_bar=None,
        *,
        is_query=True,
        convert_to_numpy=True,
        convert_to_tensor=False,
        normalize_embeddings=True,
        batch_tokens=BATCH_TOKENS,
    ):
        """One matrix per text, (tokens, dim), as PyLate's encode returns it: a list of numpy arrays by default,
        of tensors with convert_to_tensor=True or convert_to_numpy=False; one matrix for a single str, a list of
        lists for a list of lists. is_query picks the query's settings or the document's (see the drawing
        above); the prompt (see resolve_prompt) goes before every text. The rows are L2-normalised unless
        normalize_embeddings=False. Batches hold at most batch_tokens tokens (and batch_size texts, if given)."""
        if isinstance(sentences, list) and sentences and isinstance(sentences[0], list):
            options = dict(is_query=is_query, convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor)
            options |= dict(normalize_embeddings=normalize_embeddings, batch_tokens=batch_tokens)
            return [self.encode(s, prompt_name, prompt, batch_size, show_progress_bar, **options) for s in sentences]
        single = isinstance(sentences, str)
        texts = texts_list(sentences)
        prompt = self.resolve_prompt(prompt, prompt_name)
        ids, real = self.tokenize([(prompt or "") + text for text in texts], is_query)
        unseen = is_query and self.do_query_expansion and not self.attend_to_expansion_tokens
        device = self.model.device
        skiplist = torch.tensor([] if is_query else self.skiplist, dtype=torch.long, device=device)
        out, batches = [None] * len(ids), token_batches([len(i) for i in ids], batch_tokens, batch_size)
        if show_progress_bar is None:  # on long inputs, in a terminal
            show_progress_bar = len(batches) > 1 and sys.stderr.isatty()
        if show_progress_bar:
            from tqdm import tqdm

            progress = tqdm(total=len(ids), desc="Encoding", unit=" texts", file=sys.stderr)
        for batch in batches:
            input_ids = torch.tensor([t for i in batch for t in ids[i]], device=device)[None]  # (1, T)
            lengths = torch.tensor([len(ids[i]) for i in batch], device=device)
            cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            seq = torch.repeat_interleave(torch.arange(len(batch), device=device), lengths)  # (T,) each token's text
            if unseen:
                position = torch.arange(seq.shape[0], device=device) - cu_seqlens[seq]
                is_real = position < torch.tensor([real[i] for i in batch], device=device)[seq]
                hidden = encode_with_unseen_tokens(self.model, input_ids, cu_seqlens, is_real)
            else:
                hidden = self.model.encode(input_ids, cu_seqlens=cu_seqlens)[0]  # (T, hidden)
            keep = ~torch.isin(input_ids[0], skiplist)  # (T,): queries keep every token
            vectors = self.dense(hidden[keep])  # (T_kept, dim)
            if normalize_embeddings:
                vectors = F.normalize(vectors, p=2, dim=-1)
            for i, matrix in zip(batch, vectors.split(torch.bincount(seq[keep], minlength=len(batch)).tolist())):
                out[i] = matrix
            if show_progress_bar:
                progress.update(len(batch))
        if show_progress_bar:
            progress.close()
        if convert_to_numpy and not convert_to_tensor:
            out = [(m.float() if m.dtype == torch.bfloat16 else m).cpu().numpy() for m in out]  # numpy has no bf16
        return out[0] if single else out

    def similarity(self, queries_embeddings, documents_embeddings):
        """MaxSim scores (Q, D) of queries' matrices against documents' (see colbert_scores)."""
        return colbert_scores(queries_embeddings, documents_embeddings)

    def rank(self, query, documents, top_k=None, return_documents=False, **kwargs):
        """The documents best first by MaxSim against the query, as Reranker.rank returns them: [{"corpus_id":
        index in documents, "score": ...}], with "text" too if return_documents; top_k keeps the first k."""
        documents = texts_list(documents, "documents")
        options = dict(convert_to_tensor=True, **kwargs)
        scores = self.similarity(
            [self.encode(query, is_query=True, **options)], self.encode(documents, is_query=False, **options)
        )
        results = [
            {"corpus_id": i, "score": s} | ({"text": documents[i]} if return_documents else {})
            for i, s in enumerate(scores[0].tolist())
        ]
        return sorted(results, key=lambda r: r["score"], reverse=True)[:top_k]

    @property
    def dimension(self):
        """The length of one token vector."""
        return self.dense[-1].linear.out_features


# ----------------------------------------------------------------------------------------------------
# Command line: `python embed.py embed ...`, `python embed.py rerank ...` and `python embed.py colbert ...`


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="embed.py",
        description="Sentence embeddings and reranker scores from ModernBERT-family checkpoints, as Sentence "
        "Transformers computes them. Texts come as arguments, or one per line from --input (a file, or - for "
        "standard input, the default).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    embedding = commands.add_parser(
        "embed", help="one embedding per text", description="One sentence embedding per text (load_embedder)."
    )
    embedding.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (instead of --input)")
    embedding.add_argument("--prompt-name", default=None, help="a prompt of the checkpoint, e.g. query or document")
    embedding.add_argument(
        "--output",
        default=None,
        metavar="FILE.safetensors|FILE.npy",
        help="write the (N, dim) float32 embeddings there (safetensors: under the key 'embeddings'); "
        "default: print one JSON list per text on standard output",
    )
    reranking = commands.add_parser(
        "rerank",
        help="documents ranked by a reranker's score for a query",
        description="The documents ranked by a reranker's score for the query, best first (load_reranker).",
    )
    reranking.add_argument("texts", nargs="*", metavar="DOC", help="the documents to rank (instead of --input)")
    reranking.add_argument("--query", required=True, help="the query")
    reranking.add_argument("--top-k", type=int, default=None, help="print only the best k (default: all)")
    late = commands.add_parser(
        "colbert",
        help="documents ranked by a ColBERT model's MaxSim score for a query",
        description="The documents ranked by MaxSim against the query, best first, as PyLate scores them "
        "(load_colbert).",
    )
    late.add_argument("texts", nargs="*", metavar="DOC", help="the documents to rank (instead of --input)")
    late.add_argument("--query", required=True, help="the query")
    late.add_argument("--top-k", type=int, default=None, help="print only the best k (default: all)")
    for command in (embedding, reranking, late):
        command.add_argument("--model", required=True, help="hub id or local checkpoint folder")
        command.add_argument(
            "--input", default=None, metavar="FILE|-", help="one text per line (default: standard input)"
        )
        command.add_argument(
            "--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: the GPU if any, else cpu)"
        )
        command.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32")
        command.add_argument("--revision", default=None, help="hub branch, tag or commit (default: main)")
    return parser.parse_args(argv)


def read_texts(args):
    """The texts (to embed, or the documents to rank): the arguments, or the lines of --input (- or none:
    standard input)."""
    if args.texts and args.input is not None:
        raise ValueError("Give the texts as arguments or with --input, not both.")
    if args.texts:
        return args.texts
    if args.input in (None, "-"):
        return sys.stdin.read().splitlines()
    with open(args.input, encoding="utf-8") as f:
        return f.read().splitlines()


def write_embeddings(embeddings, path):
    embeddings = embeddings.float().cpu().contiguous()
    if path.endswith(".npy"):
        import numpy

        numpy.save(path, embeddings.numpy())
    else:
        from safetensors.torch import save_file

        save_file({"embeddings": embeddings}, path)


def embed_command(args):
    if args.output is not None and not args.output.endswith((".safetensors", ".npy")):
        raise ValueError(f"--output {args.output!r}: name a .safetensors or a .npy file.")
    texts = read_texts(args)
    embedder = load_embedder(args.model, device=pick_device(args.device), dtype=args.dtype, revision=args.revision)
    embeddings = embedder.encode(texts, prompt_name=args.prompt_name, convert_to_tensor=True)
    if args.output is None:
        for row in embeddings.float().tolist():
            print(json.dumps(row))
    else:
        write_embeddings(embeddings, args.output)
        print(f"{args.output}: {len(texts)} embeddings of {embedder.dimension} float32 values")


def rerank_command(args, load=load_reranker):
    """The documents ranked for the query by a reranker, or by a ColBERT model (load=load_colbert)."""
    documents = read_texts(args)
    reranker = load(args.model, device=pick_device(args.device), dtype=args.dtype, revision=args.revision)
    for r in reranker.rank(args.query, documents, top_k=args.top_k):
        print(f"{r['score']:.4f}  {r['corpus_id']}  {shown(documents[r['corpus_id']])}")


def main(argv=None):
    """`embed ...`, `rerank ...` or `colbert ...`: 0, or 2 with a one-line message on any error the user can fix."""
    args = parse_args(argv)
    commands = {"embed": embed_command, "rerank": rerank_command}
    commands["colbert"] = lambda args: rerank_command(args, load=load_colbert)
    try:
        commands[args.command](args)
    except (ValueError, OSError, RuntimeError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
