"""Load ModernBERT (from the Hugging Face hub or a folder), tokenize, and fill in masked tokens.

The plumbing around modernbert.py: download, tokenizer, fill-mask and a command line. Sentence embeddings and
rerankers live in embed.py, which builds on this file (load_embedder, load_reranker, `python embed.py embed`).

    python load.py                                       # the default demo sentence
    python load.py "The capital of France is [MASK]."
    python load.py --model ./my-checkpoint --top-k 3 "One [MASK] text." "Two [MASK] in [MASK] text."
    python load.py --model ./an-mmbert-checkpoint "The capital of France is <mask>."   # its own mask token

From Python, e.g. a notebook:

    from load import load_model, load_tokenizer, fill_mask
    model = load_model("answerdotai/ModernBERT-base")  # or a folder; task="sequence-classification", ...
    tokenizer = load_tokenizer("answerdotai/ModernBERT-base")
    fill_mask(model, tokenizer, ["The capital of France is [MASK]."])[0][0][0]
    # {'score': ..., 'token': 7785, 'token_str': ' Paris', 'sequence': 'The capital of France is Paris.'}

How and why:
- A checkpoint is a folder: config.json, model.safetensors (or shards and their index) and the tokenizer
  files. A folder is used as it is. Anything else is a hub id, fetched (modernbert.checkpoint_folder) into the
  standard HF cache, the one transformers uses, so nothing is downloaded twice. HF_HUB_OFFLINE=1 reads
  the cache only.
- The tokenizer is the official tokenizer.json run by the `tokenizers` library. Its post-processor
  already wraps every text as [CLS] text [SEP], and [MASK] swallows the space before it (lstrip), so
  the ids are transformers' ids. Nothing is ever truncated: an over-long text is an error.
- Special tokens are the checkpoint's own, never a spelling written here: ModernBERT says [MASK] and
  [PAD], mmBERT (Gemma's tokenizer) says <mask> and <pad>, and <bos> / <eos> where ModernBERT has
  [CLS] / [SEP]. They are read from tokenizer_config.json, then special_tokens_map.json, then config.json's
  ids (read_special_tokens).
- fill_mask returns what transformers' fill-mask pipeline returns (score, token, token_str, sequence),
  but runs all texts as one padded batch, and decodes only the mask rows. The vocabulary
  projection (hidden x 50368) is most of the MLM cost, and a sentence has a mask or two among dozens
  of tokens.

Depends on torch, tokenizers, huggingface_hub (only for hub ids) and modernbert.py; never on transformers.
"""

import argparse
import os
import shutil
import sys

import torch
from tokenizers import Tokenizer

from modernbert import (
    ATTN_IMPLEMENTATIONS,
    CHECKPOINT_FILES,
    DTYPES,
    LIBRARY_FILES,
    ModernBertForMaskedLM,
    ModernBertForMultipleChoice,
    ModernBertForQuestionAnswering,
    ModernBertForSequenceClassification,
    ModernBertForTokenClassification,
    ModernBertPreTrainedModel,
    checkpoint_folder,
    pick_device,
    read_json_file,
    unpad,
)

LIBRARY_FILES.add(__file__)  # the loader's warnings point past this file too, at the line that called load_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Sentence Transformers' files (1_Pooling/config.json, ...), fetched for embed.py's embedders and rerankers
EMBEDDER_FILES = ("modules.json", "*/config.json", "sentence_bert_config.json", "config_sentence_transformers.json")
HUB_FILES = (*CHECKPOINT_FILES, *TOKENIZER_FILES, *EMBEDDER_FILES)  # what a hub id fetches for load.py
DEFAULT_MODEL = "answerdotai/ModernBERT-base"
DEMO_TEXT = "Plants create {mask} through a process known as photosynthesis."  # with the model's mask token
CONTEXT_TOKENS = 10  # the command line shows a filled mask with this many tokens on either side
SHOWN_CHARACTERS = 80  # and a long text's first characters
# The special tokens read from a checkpoint (tokenizer_config.json's keys; config.json has them + "_id").
SPECIAL_TOKENS = ("mask_token", "pad_token", "cls_token", "sep_token", "bos_token", "eos_token", "unk_token")

TASKS = {
    "masked-lm": ModernBertForMaskedLM,
    "sequence-classification": ModernBertForSequenceClassification,
    "token-classification": ModernBertForTokenClassification,
    "question-answering": ModernBertForQuestionAnswering,
    "multiple-choice": ModernBertForMultipleChoice,
}
# ----------------------------------------------------------------------------------------------------
# Model and tokenizer


def load_model(
    name_or_folder=DEFAULT_MODEL,
    task="masked-lm",
    revision=None,
    device=None,
    dtype=None,
    attn_implementation=None,
    **config_overrides,
):
    """A model in eval mode. `task` is a name from TASKS or a modernbert class; `dtype` a torch dtype or
    a name ("bfloat16", "bf16": modernbert.DTYPES); `config_overrides` change the config, e.g. num_labels=3 for a
    new classifier, and the other keywords of from_pretrained (device_map, torch_dtype, cache_dir, ...) pass
    through to it."""
    cls = task if isinstance(task, type) and issubclass(task, ModernBertPreTrainedModel) else TASKS.get(task)
    if cls is None:
        raise ValueError(f"Unknown task {task!r}: use one of {sorted(TASKS)} or a modernbert model class.")
    return cls.from_pretrained(
        name_or_folder,
        revision,
        attn_implementation=attn_implementation,
        dtype=dtype,
        device=device,
        **config_overrides,
    )


def resolve(name_or_folder, revision=None):
    """A folder as it is, or a hub id's snapshot in the HF cache: the checkpoint, its tokenizer files, and
    the Sentence Transformers files an embedder or reranker has."""
    return checkpoint_folder(name_or_folder, revision, files=HUB_FILES)


def load_tokenizer(name_or_folder=DEFAULT_MODEL, revision=None):
    """The checkpoint's tokenizer.json as a `tokenizers.Tokenizer` that pads batches with the checkpoint's
    pad token and never truncates. `tokenizer.special_tokens_map` holds the checkpoint's special tokens
    ({"mask_token": "[MASK]", "pad_token": "[PAD]", ...}, as transformers names them)."""
    folder = resolve(name_or_folder, revision)
    path = tokenizer_json(folder)
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # what `tokenizers` raises for a file it cannot parse
        raise ValueError(f"Could not read {path} ({e}): fix it, or fetch the checkpoint again.") from None
    tokenizer.special_tokens_map, tokenizer.special_tokens_read = read_special_tokens(folder, tokenizer)
    tokenizer.no_truncation()
    pad = tokenizer.special_tokens_map.get("pad_token")
    if pad is not None:
        tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad), pad_token=pad)
    return tokenizer


def read_special_tokens(folder, tokenizer):
    """The checkpoint's special tokens, and a description of where they were looked for (for errors).
    Each is taken from the first of tokenizer_config.json, special_tokens_map.json (a plain string, or an
    AddedToken dict {"content": ...}) and config.json's ids (`pad_token_id`, ...) that names it; a token
    named there must be in tokenizer.json."""
    found = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        for key, value in read_json(folder, name).items():
            value = value.get("content") if isinstance(value, dict) else value
            if key in SPECIAL_TOKENS and key not in found and isinstance(value, str):
                found[key] = (value, name)
    config = read_json(folder, "config.json")
    for key in SPECIAL_TOKENS:
        i = config.get(f"{key}_id")
        if key in found or not isinstance(i, int) or not 0 <= i < tokenizer.get_vocab_size(with_added_tokens=True):
            continue  # an id outside the vocabulary names no token (id_to_token overflows on one below 0 or huge)
        if (token := tokenizer.id_to_token(i)) is not None:
            found[key] = (token, f"config.json ({key}_id {i})")
    for key, (token, source) in found.items():
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"{source} in {folder!r} says {key} is {token!r}, but tokenizer.json has no such token.")
    read = f"tokenizer_config.json, special_tokens_map.json and config.json in {folder!r}"
    return {key: token for key, (token, _) in found.items()}, read


def read_json(folder, name):
    """A JSON file of a checkpoint folder as a dict (modules.json: a list); empty when the folder has no such file."""
    path, kind = os.path.join(folder, name), list if name == "modules.json" else dict
    return read_json_file(path, kind) if os.path.isfile(path) else kind()


def tokenizer_json(folder):
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No tokenizer.json in {folder!r}: copy the tokenizer files ({', '.join(TOKENIZER_FILES)}) "
            "next to the weights."
        )
    return path


def mask_token(tokenizer):
    """The checkpoint's mask token ([MASK], <mask>, ...), or an error naming where it was looked for."""
    special = getattr(tokenizer, "special_tokens_map", None)
    if special is None:
        raise ValueError("The tokenizer does not say which token is the mask: make it with load_tokenizer(folder).")
    if "mask_token" not in special:
        raise ValueError(
            f"No mask token: {tokenizer.special_tokens_read} name none (mask_token, mask_token_id). "
            "Fill-mask needs a masked-language-model checkpoint's tokenizer."
        )
    return special["mask_token"]


def tokenize(tokenizer, texts, max_length=None, device=None):
    """Texts -> {"input_ids", "attention_mask"}: int64 tensors (B, S), padded to the longest text.
    A text longer than max_length tokens ([CLS] and [SEP] included) is an error, never truncated."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("No text given.")
    if tokenizer.padding is None:
        raise ValueError(
            "The tokenizer does not pad: make it with load_tokenizer() from a checkpoint whose tokenizer files "
            "name a pad token, or call tokenizer.enable_padding(...)."
        )
    encodings = tokenizer.encode_batch(texts)
    for i, (text, encoding) in enumerate(zip(texts, encodings)):
        n = sum(encoding.attention_mask)
        if max_length is not None and n > max_length:
            raise ValueError(
                f"Text {i + 1} is {n} tokens long, more than the model's limit of {max_length} "
                f"(max_position_embeddings): shorten it or split it. It begins {text[:40]!r}."
            )
    return {
        "input_ids": torch.tensor([e.ids for e in encodings], device=device),
        "attention_mask": torch.tensor([e.attention_mask for e in encodings], device=device),
    }


def save_with_tokenizer(model, folder, tokenizer_from, revision=None):
    """model.save_pretrained(folder), plus the tokenizer files of `tokenizer_from` (a folder or hub id),
    so that `folder` is a whole checkpoint for load.py and for transformers."""
    source = os.path.dirname(tokenizer_json(resolve(tokenizer_from, revision)))
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))


# ----------------------------------------------------------------------------------------------------
# Fill-mask, as transformers' pipeline("fill-mask") computes it


def check_masks(texts, mask):
    """An error naming the first text without the mask token (cheap, so the CLI checks before loading a model)."""
    for i, text in enumerate(texts):
        if mask not in text:
            raise ValueError(f"Text {i + 1} has no {mask} to fill: {text!r}")


def fill_mask(model, tokenizer, texts, top_k=5):
    """For each text (a str or a list of them), for each mask token in it (the checkpoint's: [MASK] for
    ModernBERT, <mask> for mmBERT), the top_k predictions:
    [[[{"score", "token", "token_str", "sequence"}, ...] per mask] per text], the fields and values of
    transformers' fill-mask pipeline. Scores are independent softmaxes per mask, not joint ones."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not isinstance(model, ModernBertForMaskedLM):
        raise TypeError(f"fill_mask needs a ModernBertForMaskedLM (task='masked-lm'), got {type(model).__name__}.")
    if not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"top_k must be between 1 and the vocabulary size {model.config.vocab_size}, got {top_k}.")
    mask = mask_token(tokenizer)
    check_masks(texts, mask)
    mask_id = tokenizer.token_to_id(mask)
    batch = tokenize(tokenizer, texts, max_length=model.config.max_position_embeddings, device=model.device)
    scores, tokens = predict_masks(model, batch["input_ids"], batch["attention_mask"], mask_id, top_k)
    predictions = iter(zip(scores.tolist(), tokens.tolist()))  # rows in text order, then position order
    results = []
    for ids, real in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        ids = [t for t, r in zip(ids, real) if r]  # this text's tokens, without the batch's padding
        masks = [p for p, t in enumerate(ids) if t == mask_id]
        results.append([candidates(tokenizer, ids, p, *next(predictions), single_mask=len(masks) == 1) for p in masks])
    return results


@torch.inference_mode()
def predict_masks(model, input_ids, attention_mask, mask_id, top_k):
    """The sparse decoder: encode the batch (packed, padding dropped), then run the head and the
    vocabulary projection on the mask rows only. Returns probabilities and token ids, both (M, top_k),
    one row per mask in packed order: text by text, left to right."""
    hidden, packing, _ = model.model.encode(input_ids, attention_mask)  # (T, hidden), real tokens only
    at_mask = unpad(input_ids, packing.indices) == mask_id  # (T,)
    logits = model.decoder(model.head(hidden[at_mask]))  # (M, vocab)
    return logits.float().softmax(dim=-1).topk(top_k)


def candidates(tokenizer, ids, position, scores, tokens, single_mask):
    """The pipeline's dicts for one mask. `sequence` is the text with this mask filled in; as in the
    pipeline, special tokens are dropped only when the text has a single mask. With several, they
    stay, so that the other masks show (and [CLS]/[SEP] with them)."""
    pad_id = tokenizer.padding["pad_id"] if tokenizer.padding else None
    out = []
    for score, token in zip(scores, tokens):
        filled = [t for t in ids[:position] + [token] + ids[position + 1 :] if t != pad_id]
        sequence = tokenizer.decode(filled, skip_special_tokens=single_mask)
        out.append(
            {
                "score": score,
                "token": token,
                "token_str": tokenizer.decode([token], skip_special_tokens=False),
                "sequence": sequence,
            }
        )
    return out


# ----------------------------------------------------------------------------------------------------
# Command line


def shown(s, strip=False):
    """A string to print on one line: without the BPE leading space if asked, repr() if unprintable."""
    t = s.strip() if strip else s
    return t if t and t.isprintable() else repr(s)


def format_results(tokenizer, texts, results):
    """fill_mask's results as lines for a terminal: each text (its beginning, if long), then for each of its
    masks the top-k tokens, each shown in place among its neighbours (in_context), not in the pipeline's
    `sequence`: that is the whole text, kilobytes on every line for a long one."""
    mask = mask_token(tokenizer)
    mask_id, lines = tokenizer.token_to_id(mask), []
    for text, masks in zip(texts, results):
        long = len(text) > 2 * SHOWN_CHARACTERS
        header = f"{text[:SHOWN_CHARACTERS]}... ({len(text):,} characters)" if long else text
        lines += ["", header] if lines else [header]
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        positions = [i for i, t in enumerate(ids) if t == mask_id]
        for m, (position, predictions) in enumerate(zip(positions, masks)):
            lines.append(f"  {mask} {m + 1} of {len(masks)}:")
            width = max(len(shown(p["token_str"], strip=True)) for p in predictions)
            for p in predictions:
                token, context = shown(p["token_str"], strip=True), in_context(tokenizer, ids, position, p["token"])
                lines.append(f"    {p['score']:.4f}  {token:<{width}}  (id {p['token']:>5})  {shown(context)}")
    return "\n".join(lines)


def in_context(tokenizer, ids, position, token):
    """The text around ids[position] with `token` in its place: CONTEXT_TOKENS tokens on either side, and "..."
    where the text goes on."""
    start, end = max(position - CONTEXT_TOKENS, 0), position + 1 + CONTEXT_TOKENS
    around = tokenizer.decode(ids[start:position] + [token] + ids[position + 1 : end], skip_special_tokens=False)
    return "..." * (start > 0) + around + "..." * (end < len(ids))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Fill in masked tokens with ModernBERT: the top-k tokens for every mask of every text. "
        "Sentence embeddings and reranker scores: `python embed.py --help`."
    )
    parser.add_argument(
        "texts",
        nargs="*",
        metavar="TEXT",
        help="texts with one or more of the model's mask token ([MASK] for ModernBERT, <mask> for mmBERT; "
        f"default: {DEMO_TEXT!r} with the model's mask token)",
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"hub id or local checkpoint folder (default: {DEFAULT_MODEL})"
    )
    parser.add_argument("--top-k", type=int, default=5, help="predictions per mask (default: 5)")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: the GPU if any, else cpu)"
    )
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32")
    parser.add_argument(
        "--attn",
        default=None,
        choices=[a for a in ATTN_IMPLEMENTATIONS if a],
        help="attention kernel (default: chosen from device and dtype)",
    )
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit (default: main)")
    return parser.parse_args(argv)


def main(argv=None):
    """Prints the predictions; exits with status 2 and a one-line message on any error the user can
    fix: no mask token, a text too long, no such folder or hub model, no network, no GPU."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("embed", "rerank"):  # where these commands were before embed.py had its own
        print(
            f"error: `load.py {argv[0]}` is now `python embed.py {argv[0]}`, with the same arguments.", file=sys.stderr
        )
        return 2
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        folder = resolve(args.model, args.revision)
        tokenizer = load_tokenizer(folder)  # cheap checks first: no tokenizer or no mask fails before the weights
        mask = mask_token(tokenizer)
        texts = args.texts or [DEMO_TEXT.format(mask=mask)]
        check_masks(texts, mask)  # before loading the weights: a mistyped text fails fast
        model = load_model(folder, device=device, dtype=args.dtype, attn_implementation=args.attn)
        results = fill_mask(model, tokenizer, texts, top_k=args.top_k)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_results(tokenizer, texts, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
