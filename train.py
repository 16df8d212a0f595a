"""Train a ModernBERT with the paper's pretraining recipe, in one file, from one CPU to many GPUs.

    python train.py      # offline: a small model, 1,440 steps on the standard library's docstrings, on any machine
    python train.py --data notes/ --out my-bert --minutes 60
    python train.py --init answerdotai/ModernBERT-base --data my-domain/ --out my-bert --steps 2000
    torchrun --nproc-per-node 8 train.py --data corpus/ --steps 50000 --dtype bf16 --compile

The recipe is ModernBERT's (Warner et al., 2024, "Smarter, Better, Faster, Longer", arXiv:2412.13663, and its
code, github.com/AnswerDotAI/ModernBERT). One section each, in the order the run takes them:

1. documents: .txt files split at blank lines, or every docstring of the standard library; every 50th held out.
2. tokenizer: the checkpoint's own (--init), or a byte-level BPE trained here with ModernBERT's special tokens.
3. packing: whole documents packed best-fit into batches of a token budget, as the official packer does; their
   boundaries go to the model as `cu_seqlens`, so no token attends across documents.
4. masking: 30% of the real tokens (MosaicBERT's rate, Portes et al., 2023, arXiv:2312.17482; BERT's was 15%),
   80/10/10; only the masked rows reach the vocabulary (sparse prediction: Cramming, arXiv:2212.14034).
5. StableAdamW (Wortsman et al., 2023, arXiv:2304.13013, as github.com/warner-benjamin/optimi implements it):
   update clipping instead of gradient clipping, fully decoupled weight decay, none on norms and biases.
6. the schedule: warmup, stable, then a 1 - sqrt cooldown (Hägele et al., 2024, arXiv:2405.18392).
7. training: the step, held-out loss and masked-token accuracy, and the loop that joins them.

Each piece switches to its classic counterpart, to see what it buys: --no-packing (one document a row, padded to
--max-len), --mask-rate 0.15, --dense-prediction (every position through the decoder), --optimizer adamw (with
gradient clipping at 1.0), --schedule linear (warmup, then linear decay to 0). Held-out batches stay the same.

Where this differs from the official pretraining, on purpose: no batch-size warmup (its schedule spans tens of
billions of tokens); no dropout (the official 0.1 after attention helps a run that sees 2T tokens, not one of a few
minutes; Cramming drops it too); the held-out set is masked at 15%, as the official evaluation does. The default
model is the Ettin suite's 17M encoder (Weller et al., 2025, arXiv:2507.11412: ModernBERT's recipe at small scale)
with 4 layers of 7, and its weight decay (3e-4); its learning rate is 1e-3, not Ettin's 3e-3 (for batches of 4.7M
tokens: with 2,048, 3e-3 kept a run of this size long on the plateau of unigram guesses), and its batch 1,024 tokens:
for the same tokens, twice the steps of half the batch learned more (docs/training.md has these runs).

Below the PLUMBING banner: the run's setup, --resume and the output folder (a kill at any moment leaves the last
whole checkpoint), Ctrl-C and SIGTERM, torchrun, logging, the command line. Needs torch, tokenizers, tqdm,
modernbert.py and load.py; never transformers.
"""

import argparse
import ast
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import stat
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm

import load
from modernbert import (
    ModernBertConfig,
    ModernBertForMaskedLM,
    cu_seqlens_from_lengths,
    current_umask,
    pick_device,
    read_json_file,
)

# The default run: a fixed number of steps, the same run on every machine (--minutes N sizes a run by the clock
# instead). Each setting is a flag: batch_tokens is --batch-tokens.
DEFAULTS = dict(out="trained-modernbert", steps=1440, seed=0, log_every=10, evals=10, save_every=0)
DEFAULTS |= dict(layers=4, hidden=256, heads=4, intermediate=384, vocab=8192)  # Ettin 17M's shape, 4 layers of 7
DEFAULTS |= dict(max_len=512, batch_tokens=1024, accum=1, mask_rate=0.3)  # pieces, packing, masking
DEFAULTS |= dict(lr=1e-3, weight_decay=3e-4, warmup_steps=None, cooldown=0.2)  # StableAdamW; WSD (warmup: 5%)
DEFAULTS |= dict(packing=True, sparse_prediction=True, optimizer="stableadamw", schedule="wsd")  # the paper's pieces
IGNORE = -100  # the label of every token the loss does not see
HELD_OUT_EVERY = 50  # every 50th document is held out for evaluation
EVAL_MASK_RATE = 0.15  # the official evaluation masks 15%; training masks --mask-rate (30%)

# ----------------------------------------------------------------------------------------------------
# 1. Documents


def read_documents(paths):
    """The documents of --data: each file split at blank lines; a folder gives every .txt file under it. Without
    --data (no paths), every docstring of the standard library."""
    if not paths:
        return list(stdlib_docstrings())
    return [d.strip() for text in read_texts(paths) for d in re.split(r"\n[ \t]*\n", text) if d.strip()]


def split_held_out(documents):
    """(training, held-out) documents. Exact duplicates go first, so held-out text is text never trained on."""
    documents = list(dict.fromkeys(documents))
    if len(documents) < 2:
        raise ValueError(
            f"--data holds {len(documents)} document(s) of text: at least 2 are needed, one to train on and one "
            "held out. Blank lines separate documents."
        )
    held_out = documents[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY] or documents[-1:]
    held = set(held_out)
    return [d for d in documents if d not in held], held_out


# ----------------------------------------------------------------------------------------------------
# 2. The tokenizer: a byte-level BPE as ModernBERT's (NFC, GPT-2's byte alphabet, no unknown bytes), with its
# special tokens; [MASK] swallows the space before it, so "is [MASK]." tokenizes as the words around it.

SPECIAL_TOKENS = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]"}
SPECIAL_TOKENS["mask_token"] = "[MASK]"


def train_tokenizer(documents, vocab_size):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False, lstrip=t == "[MASK]") for t in SPECIAL_TOKENS.values()]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(cut_long_words(documents), trainer)  # megabytes without a space, in pieces
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))],
    )
    return tokenizer


def tokenize(tokenizer, vocab, documents, max_len):
    """Each document as [CLS] tokens [SEP], cut into pieces of at most max_len tokens (each wrapped the same way),
    so no text is thrown away; the official code truncates instead, on documents that rarely need it."""
    pieces, room = [], max_len - 2
    for encoding in tokenizer.encode_batch(documents, add_special_tokens=False):
        ids = encoding.ids
        pieces += [[vocab.cls, *ids[i : i + room], vocab.sep] for i in range(0, max(len(ids), 1), room)]
    return pieces


# ----------------------------------------------------------------------------------------------------
# 3. Packing: whole documents into batches of a token budget, best fit, with no attention across documents.
#
#   documents   C a a a S | C b b b b b b b S | C c c c c c S      C = [CLS], S = [SEP], P = [PAD]
#   batch 1     C a a a S C b b b b b b b S P P                     a budget of 16 tokens: c waits for batch 2
#   cu_seqlens  0         5                 14  16                  the padding is one more sequence
#
# The model sees the batch as input_ids (1, 16) with cu_seqlens: attention stays inside each sequence, RoPE
# positions restart at 0 in each, and the padding is a sequence of its own that no document sees.
# --no-packing, the classic batch: `rows` documents a batch in order, each alone in a row of max_len, padded.


def best_fit(lengths, budget, open_batches=8):
    """Lists of document indices, each list at most `budget` tokens. Each document goes into the open batch with
    the least room that still holds it; when none does, a new batch opens, and past `open_batches` open ones
    the fullest is closed (the official packer keeps a buffer of documents the same way)."""
    batches = []  # [room left, indices]
    for i, n in enumerate(lengths):
        check_budget(n, budget)
        batch = min((b for b in batches if b[0] >= n), key=lambda b: b[0], default=None)  # the fullest that fits
        if batch is None:
            if len(batches) == open_batches:
                fullest = min(batches, key=lambda b: b[0])
                batches.remove(fullest)
                yield fullest[1]
            batch = [budget, []]
            batches.append(batch)
        batch[0] -= n
        batch[1].append(i)
    yield from (b[1] for b in sorted(batches, key=lambda b: b[0]))


@dataclass
class Batch:
    input_ids: torch.Tensor  # (1, T): documents back to back, then padding
    cu_seqlens: torch.Tensor  # (N + 1,) int32: where each document starts and ends, the padding its own sequence
    real: torch.Tensor  # (1, T) bool: False on the padding
    labels: torch.Tensor | None = None  # (1, T): the original token where masked, IGNORE elsewhere

    def to(self, device):
        return Batch(**{k: v.to(device) if v is not None else None for k, v in vars(self).items()})


def pack(pieces, budget, pad_id, max_len, rows=0):
    """One Batch of exactly `budget` tokens from these documents (their total must fit). The padding after them
    is sequences of their own, none longer than max_len (the model's longest). With rows (--no-packing), each
    document is padded to max_len first, its padding a sequence of its own too."""
    sequences = [(p, True) for p in pieces]  # (tokens, real)
    if rows:
        sequences = [s for p in pieces for s in ((p, True), ([pad_id] * (max_len - len(p)), False))]
    padding = budget - sum(len(s) for s, _ in sequences)
    sequences += [([pad_id] * max_len, False)] * (padding // max_len) + [([pad_id] * (padding % max_len), False)]
    sequences = [(s, real) for s, real in sequences if s]  # no empty one
    ids = torch.tensor([[t for s, _ in sequences for t in s]])
    real = torch.tensor([[r for s, r in sequences for _ in s]])
    return Batch(ids, cu_seqlens_from_lengths([len(s) for s, _ in sequences]), real)


def epoch_plan(pieces, budget, seed, epoch, rows=0):
    """The batches of one epoch, as lists of piece indices: the pieces in a fresh order each epoch, best fit; or
    (--no-packing) `rows` of them a batch, in that order."""
    order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    if rows:
        return [order[i : i + rows] for i in range(0, len(order), rows)]
    return [[order[i] for i in batch] for batch in best_fit([len(pieces[i]) for i in order], budget)]


def numbered_batches(pieces, budget, seed, start=0, rows=0):
    """The training stream: (number, epoch as a float, piece indices) for every packed batch, epoch after epoch,
    numbered from 0 and starting at number `start` (a resumed run skips what it has done; packing is cheap)."""
    number = 0
    for epoch in range(sys.maxsize):
        plan = epoch_plan(pieces, budget, seed, epoch, rows)
        for i, batch in enumerate(plan):
            if number >= start:
                yield number, epoch + i / len(plan), batch
            number += 1


# ----------------------------------------------------------------------------------------------------
# 4. Masking: one uniform draw r per token decides all (as the official code): r < 0.8 p -> [MASK],
# 0.8 p <= r < 0.9 p -> a random token, 0.9 p <= r < p -> unchanged, r >= p -> not a target. Padding never.


def mask_tokens(batch, rate, vocab, generator):
    ids = batch.input_ids
    r = torch.rand(ids.shape, generator=generator)
    chosen = (r < rate) & batch.real
    random_ids = torch.randint(vocab.size, ids.shape, generator=generator)
    inputs = torch.where(chosen & (r < 0.8 * rate), vocab.mask, ids)
    inputs = torch.where(chosen & (r >= 0.8 * rate) & (r < 0.9 * rate), random_ids, inputs)
    return Batch(inputs, batch.cu_seqlens, batch.real, labels=torch.where(chosen, ids, IGNORE))


def batch(pieces, indices, settings, vocab, rate, number, rows=0):
    """Packed batch `number` of these pieces, masked with its own random stream: the same masks whichever process,
    or resumed run, builds it (held-out batches have negative numbers)."""
    generator = torch.Generator().manual_seed(settings["seed"] * 1_000_003 + number)
    packed = pack([pieces[i] for i in indices], settings["batch_tokens"], vocab.pad, settings["max_len"], rows)
    return mask_tokens(packed, rate, vocab, generator)


def held_out_batches(pieces, settings, vocab):
    """The held-out set as every evaluation sees it: best-fit batches of --batch-tokens (whatever --no-packing),
    masked at EVAL_MASK_RATE, each with its own stream (negative numbers), so the masks never change in a run."""
    plan = best_fit([len(p) for p in pieces], settings["batch_tokens"])
    return [batch(pieces, b, settings, vocab, EVAL_MASK_RATE, number=-1 - n) for n, b in enumerate(plan)]


# ----------------------------------------------------------------------------------------------------
# 5. StableAdamW (Wortsman et al., 2023; optimi's implementation, which the official code copies)


def debias(beta, step):
    """Adam's bias correction folded into the decay rate: an average with this rate at step t is already the
    corrected average (beta_t = beta (1 - beta^(t-1)) / (1 - beta^t); 0 at step 1, so m_1 = g_1)."""
    return (beta**step - beta) / (beta**step - 1)


class StableAdamW(torch.optim.Optimizer):
    """AdamW with two changes, as the official ModernBERT pretraining runs it (decoupled_stableadamw):

    - update clipping: each tensor's step shrinks by its update RMS, sqrt(mean(g^2 / v)), when that exceeds 1,
      that is when this gradient is large against the running average of past ones (Adafactor's clipping);
    - fully decoupled weight decay: each step shrinks a weight by lr_t / lr_max * weight_decay, so the decay
      follows the schedule but not the peak learning rate (torch's AdamW shrinks by lr_t * weight_decay).
    With neither active (RMS <= 1, weight_decay = lr_max * AdamW's), it is torch.optim.AdamW exactly."""

    def __init__(self, params, lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-5):
        super().__init__(params, dict(lr=lr, max_lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (beta1, beta2), eps = group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state["step"], state["exp_avg"], state["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - debias(beta1, state["step"]))
                v.mul_(debias(beta2, state["step"])).addcmul_(g, g, value=1 - debias(beta2, state["step"]))
                scratch = v.clamp(min=eps**2)  # one scratch tensor, in place: on a CPU, new big ones cost more
                rms = scratch.reciprocal_().mul_(g).mul_(g).mean().sqrt()  # sqrt(mean(g^2 / v)), a tensor: no sync
                lr = group["lr"] / rms.clamp(min=1.0)
                p.mul_(1 - lr / group["max_lr"] * group["weight_decay"])
                update = torch.div(m, torch.sqrt(v, out=scratch).add_(eps), out=scratch)  # m / (sqrt(v) + eps)
                p.sub_(update.mul_(lr))


class ClippedAdamW(torch.optim.AdamW):
    """--optimizer adamw, the classic: torch's AdamW after clipping the gradients' total norm to 1.0 (what AdamW
    runs with, and what StableAdamW's update clipping replaces)."""

    def step(self):
        torch.nn.utils.clip_grad_norm_([p for group in self.param_groups for p in group["params"]], 1.0)
        super().step()


def new_optimizer(model, settings):
    """StableAdamW, or ClippedAdamW with the same groups, betas and eps."""
    groups = param_groups(model, settings["weight_decay"])
    if settings["optimizer"] == "adamw":  # AdamW's decay is per unit of lr: this one decays as ours at the peak
        groups = [g | {"weight_decay": g["weight_decay"] / settings["lr"]} for g in groups]
        return ClippedAdamW(groups, lr=settings["lr"], betas=(0.9, 0.98), eps=1e-6)
    return StableAdamW(groups, lr=settings["lr"])


def param_groups(model, weight_decay):
    """Weight decay on matrices (the embeddings too, tied to the decoder), none on norms and biases; each group
    keeps its parameters' names, for saving the optimizer's state by name. A tied weight is listed once."""
    groups = [
        {"params": [], "names": [], "weight_decay": weight_decay},
        {"params": [], "names": [], "weight_decay": 0.0},
    ]
    for name, p in model.named_parameters():
        group = groups[p.ndim <= 1 or name.endswith(".bias")]
        group["params"].append(p)
        group["names"].append(name)
    return groups


# ----------------------------------------------------------------------------------------------------
# 6. The learning rate: warmup, stable, decay (WSD)
#
#   lr   |    ________________________
#        |   /                        '-._        linear warmup over --warmup-steps, constant, then
#        |  /                             '.      lr * (a + (1 - a) (1 - sqrt(x))) over the last --cooldown
#        | /                                \     of the run, x going 0 -> 1, a = 0.001
#        +-----------------------------------+--> progress (steps, or time with --minutes)


def learning_rate(peak, step, progress, warmup_steps, cooldown, final=0.001, schedule="wsd"):
    """The learning rate of optimizer step `step` (0, 1, ...), which ends at `progress` (0..1) of the run. --schedule
    linear, the classic: the same warmup, then straight down to 0 at the end (transformers' linear schedule)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if schedule == "linear":
        warmup_share = warmup_steps * progress / (step + 1)  # of the run: exact by steps, as near as time tells
        return peak * min(warm, (1 - progress) / max(1 - warmup_share, 1e-9))
    x = min(1.0, max(0.0, (progress - (1 - cooldown)) / cooldown)) if cooldown else 0.0
    return peak * warm * (final + (1 - final) * (1 - math.sqrt(x)))


# ----------------------------------------------------------------------------------------------------
# 7. Training: the step, evaluation, and the loop that joins the pieces


def train_step(model, optimizer, batches, counts, autocast):
    """Forward and backward over this process's batches of one step, then one optimizer step. `counts`: the
    masked tokens of each batch here, and of the whole step over all processes. Each batch's loss is weighted
    by its share of the step's masked tokens, so the step minimises the mean over all of them, however the
    batches are spread over processes (x world size: DDP divides the summed gradients by it). Returns this
    process's share of the step's loss."""
    mine, total = counts
    world = dist.get_world_size() if dist.is_initialized() else 1
    step_loss = 0.0
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        # DDP averages gradients at each backward; accumulate locally and synchronise on the last batch only
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync, autocast():
            out = model(batch.input_ids, cu_seqlens=batch.cu_seqlens, labels=batch.labels)
            if mine[i]:
                loss = out.loss * (mine[i] / total)
            else:  # no masked token: a zero that still reaches every parameter, as DDP expects
                loss = out.logits.sum() * 0.0
            (loss * world).backward()
        step_loss += loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


@torch.no_grad()
def evaluate(model, batches, autocast):
    """Held-out loss and accuracy over the masked tokens (the same masks every time), with `model` unwrapped."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for batch in batches:
        targets = batch.labels[batch.labels != IGNORE]  # the rows of the sparse logits, in order
        if len(targets):
            with autocast():
                out = model(batch.input_ids, cu_seqlens=batch.cu_seqlens, labels=batch.labels)
            logits = out.logits if out.logits.dim() == 2 else out.logits[batch.labels != IGNORE]  # dense: its rows
            loss += out.loss.item() * len(targets)
            correct += (logits.argmax(-1) == targets).sum().item()
            count += len(targets)
    model.train()
    return (loss / count, correct / count) if count else (math.nan, math.nan)


def train(settings):
    """The whole run: sections 1 to 6 joined, then the loop. Returns (held-out loss, accuracy, baseline)."""
    start = time.perf_counter()
    rank, world, device = setup_processes(settings)  # one process, or torchrun's
    autocast = mixed_precision(device, settings.get("dtype"))  # bf16: autocast, weights stay fp32
    with tempfile.TemporaryDirectory() as tokenizer_tmp:
        # documents -> tokenizer -> pieces, and the model: a new one, --init's, or the --resume'd run's
        model, tokenizer_folder, vocab, pieces, held_pieces = build(settings, rank, tokenizer_tmp, device)
        budget, per_step = settings["batch_tokens"], world * settings["accum"]
        held_out = held_out_batches(held_pieces, settings, vocab)
        top_token, baseline = most_frequent_token_accuracy(pieces, held_out)
        held_out = [b.to(device) for b in held_out]
        optimizer = new_optimizer(model, settings)
        state = new_state(settings, budget * per_step)  # what trainer_state.json records
        if settings["resume"]:
            resume_state(state, optimizer, settings["out"])
        seconds_left = settings.get("minutes", 0) * 60 - (time.perf_counter() - start)
        clock = Clock(settings, state, world, device, seconds_left)  # how far the run is: steps, or --minutes
        ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        rows = 0 if settings["packing"] else budget // settings["max_len"]  # --no-packing: documents a batch
        stream = numbered_batches(pieces, budget, settings["seed"], state["global_step"] * per_step, rows)
        log = Log(settings, state, show=rank == 0, baseline=baseline)
        log.start(pieces, held_pieces, vocab, model, device, world, clock)
        with StopOnSignal(device) as stop:  # SIGINT, SIGTERM: noted, and the run stops after its step
            while not stop.agreed() and (progress := clock.progress_after_next_step()) <= 1.0:
                t0 = time.perf_counter()
                numbered = [next(stream) for _ in range(per_step)]
                mine = [  # this process's share: batches rank, rank + world, ...
                    batch(pieces, b, settings, vocab, settings["mask_rate"], n, rows).to(device)
                    for n, _, b in numbered[rank::world]
                ]
                counts = [int((b.labels != IGNORE).sum()) for b in mine]
                step, warmup, cooldown = state["global_step"], clock.warmup_steps, settings["cooldown"]
                lr = learning_rate(settings["lr"], step, progress, warmup, cooldown, schedule=settings["schedule"])
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = train_step(ddp, optimizer, mine, (counts, all_sum(sum(counts), device)), autocast)
                loss, tokens = all_sum(loss, device), all_sum(sum(int(b.real.sum()) for b in mine), device)
                check_finite(loss, lr, state["global_step"] + 1, settings["out"])  # a NaN stops the run, unsaved
                clock.step_done(time.perf_counter() - t0)
                state["epoch"], state["tokens_seen"] = numbered[-1][1], state["tokens_seen"] + int(tokens)
                log.step(loss, lr, tokens, progress, clock.last_seconds)
                if log.eval_due(progress):
                    log.eval(*evaluate(model, held_out, autocast))
                if settings["save_every"] and state["global_step"] % settings["save_every"] == 0 and rank == 0:
                    save_run(settings["out"], model, optimizer, state, settings, tokenizer_folder)
            log.close()
            if not stop.stopped:  # an interrupted run saves at once: a cluster's grace period is short
                eval_loss, accuracy = evaluate(model, held_out, autocast)
                log.eval(eval_loss, accuracy)
            if rank == 0:
                save_run(settings["out"], model, optimizer, state, settings, tokenizer_folder)
            stop.raise_if_stopped(state["global_step"], settings["out"])  # main says so, and exits
    end_processes()
    log.result(accuracy, baseline, top_token, time.perf_counter() - start)
    return eval_loss, accuracy, baseline


# ----------------------------------------------------------------------------------------------------
# PLUMBING. The recipe ends above, and a first reading may stop here. What follows serves it: the run's setup,
# resuming, its clock, torchrun, the output folder, logging, samples and the command line.

# ----------------------------------------------------------------------------------------------------
# The run's setup: the data's files, the tokenizer's files and ids, and the model (new, --init's or --resume's).
# Everything is checked before the model costs anything, and before anything is written.

MODEL_FLAGS = {  # flag -> ModernBertConfig field, for a new model (and the check of a resumed one)
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "intermediate": "intermediate_size",
}


def read_texts(paths):
    """The text of each file of --data, a folder giving every .txt file under it. In a folder, what is not a regular
    file is skipped, one line a kind saying so (a FIFO would block open() until something writes to it); named,
    it is an error."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names if f.endswith(".txt"))
            by_kind = {}  # "file", "FIFO", "socket", ... -> paths
            for name in found:
                by_kind.setdefault(file_kind(name), []).append(name)
            regular = by_kind.pop("file", [])
            for kind, names in by_kind.items():
                n, shown = len(names), ", ".join(names[:2]) + ", ..." * (len(names) > 2)
                what = "not regular files" if n > 1 else "not a regular file"
                say(f"--data {path}: skipped {n} {kind}{'s' * (n > 1)} ({shown}): {what}.")
            if not regular:
                raise ValueError(
                    f"--data {path}: the folder holds no .txt file{' that is a regular file' * bool(found)}."
                )
            files += regular
        elif os.path.isfile(path):
            files.append(path)
        elif os.path.exists(path):
            raise ValueError(f"--data {path} is a {file_kind(path)}, not a regular file: pass .txt files or folders.")
        else:
            raise FileNotFoundError(f"--data {path}: no such file or folder.")
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            text = "\0"
        if "\0" in text:
            raise ValueError(f"--data {path} is not text (not UTF-8, or binary): pass .txt files.")
        yield text


def stdlib_docstrings():
    """Every docstring (module, class, function) of this Python's standard library, read from the source with
    `ast`: about 8,000 documents, 1.8 MB of English about programming, on every machine that has Python."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in skip)
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a template or a file in another encoding
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    if doc := ast.get_docstring(node):
                        yield doc


def file_kind(path):
    """What a path is: "file" (a regular file, or a link to one), "FIFO", "socket", "device", ..."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "broken link"
    kinds = {stat.S_ISREG: "file", stat.S_ISFIFO: "FIFO", stat.S_ISSOCK: "socket", stat.S_ISDIR: "folder"}
    kinds |= {stat.S_ISCHR: "device", stat.S_ISBLK: "device"}
    return next((kind for test, kind in kinds.items() if test(mode)), "special file")


def say(line):
    """A note on stderr, from process 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(line, file=sys.stderr)


LONGEST_WORD = 100  # characters: the longest run without whitespace that the tokenizer trainer sees whole


def cut_long_words(documents):
    """The documents as the tokenizer trainer reads them: each run of more than LONGEST_WORD characters without
    whitespace (or of whitespace) cut into pieces of LONGEST_WORD, each its own text. BPE training rescans a whole
    word at every merge that touches it, so one word of megabytes (text without spaces) kept it busy for hours;
    in pieces it costs what any text of that size does. The standard library's docstrings have no such run."""
    long_run = re.compile(rf"\S{{{LONGEST_WORD + 1},}}|\s{{{LONGEST_WORD + 1},}}")
    for document in documents:
        start = 0
        for run in long_run.finditer(document):
            for cut in range(run.start() + LONGEST_WORD, run.end(), LONGEST_WORD):
                yield document[start:cut]
                start = cut
        yield document[start:]


def check_budget(length, budget):
    if length > budget:
        raise ValueError(
            f"--batch-tokens {budget} cannot hold one document of {length} tokens: raise --batch-tokens to at "
            "least --max-len, or lower --max-len (documents are cut into pieces of --max-len tokens)."
        )


def memory_needed(sizes, batch_tokens, accum, mask_rate, bf16):
    """(bytes, parameters): the least a training step holds, for `sizes` {layers, hidden, intermediate, vocab}.
    16 bytes a parameter (fp32 weights, their gradients, StableAdamW's two moments); per token of a batch, what
    backward keeps of each layer even where torch.compile recomputes what it can (the residual stream at both norms,
    q, k, v and the attention's output: 6 x hidden; GeGLU's input: 2 x intermediate) and the masked rows' logits;
    the step's batches (ids and labels in int64, a bool: 17 bytes a token). mask_rate 1: --dense-prediction."""
    layers, hidden, intermediate, vocab = (sizes[k] for k in ("layers", "hidden", "intermediate", "vocab"))
    params = vocab * hidden + layers * (4 * hidden**2 + 3 * hidden * intermediate) + hidden**2 + vocab  # tied decoder
    per_token = (layers * (6 * hidden + 2 * intermediate) + 2 * hidden + mask_rate * vocab) * (2 if bf16 else 4)
    return int(16 * params + batch_tokens * per_token + accum * batch_tokens * 17), params


def check_memory(settings, config, device):
    """A model or batch that cannot fit is an error before the data is read, not a MemoryError (or a machine that
    swaps for minutes) after it: memory_needed against the memory free on the device."""
    sizes = settings
    if config is not None:  # --init's or --resume's checkpoint
        sizes = {flag: getattr(config, field) for flag, field in MODEL_FLAGS.items()} | {"vocab": config.vocab_size}
    bf16, decoded = settings.get("dtype") == "bf16", settings["mask_rate"] if settings["sparse_prediction"] else 1.0
    needed, params = memory_needed(sizes, settings["batch_tokens"], settings["accum"], decoded, bf16)
    if device.type == "cpu":  # torchrun's processes on this machine share its memory
        needed *= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    free = free_memory(device)
    if free is not None and needed > free:
        accum = f" x --accum {settings['accum']:,}" if settings["accum"] > 1 else ""
        raise ValueError(
            f"This run needs at least {needed / 2**30:,.1f} GiB ({params / 1e6:,.1f}M parameters at 16 bytes each for "
            f"weights, gradients and StableAdamW's moments, and the activations of --batch-tokens "
            f"{settings['batch_tokens']:,}{accum}), more than the "
            f"{free / 2**30:,.1f} GiB free on {device}: make the model, --batch-tokens or --accum smaller."
        )


def free_memory(device):
    """Bytes free for this run on the device (MemAvailable on a CPU), or None where it cannot be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and os.path.isfile("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            found = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(found[1]) * 1024 if found else None
    return None


def check_samples(texts, tokenizer, longest):
    """--samples are checked before training rather than found wrong after it: each has a mask to fill, and is no
    longer than the model's `longest` tokens."""
    if not texts:
        return
    try:
        texts = sample_texts(texts, load.mask_token(tokenizer))
    except ValueError as e:
        raise ValueError(f"--samples: {e}") from None
    for i, encoding in enumerate(tokenizer.encode_batch(texts)):
        if len(encoding.ids) > longest:
            raise ValueError(
                f"--samples: text {i + 1} is {len(encoding.ids)} tokens long, more than the model's {longest} tokens: "
                "shorten it."
            )


def save_tokenizer(tokenizer, folder, max_len):
    """tokenizer.json, and the two files that name its special tokens, for load.py and transformers alike."""
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, **SPECIAL_TOKENS}
    config |= {"clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"]}
    write_json(os.path.join(folder, "tokenizer_config.json"), config)
    write_json(os.path.join(folder, "special_tokens_map.json"), SPECIAL_TOKENS)


@dataclass
class Vocab:
    """The ids training needs, read once from the tokenizer (read_vocab)."""

    size: int  # the tokenizer's ids: random replacements are drawn from them
    mask: int
    pad: int
    cls: int
    sep: int


def read_vocab(tokenizer):
    """The Vocab of a tokenizer, by the checkpoint's own spellings: [MASK] or <mask>, [CLS] or <bos>."""
    special = tokenizer.special_tokens_map

    def find(*names):
        return next((tokenizer.token_to_id(special[n]) for n in names if n in special), None)

    ids = dict(mask=find("mask_token"), pad=find("pad_token"), cls=find("cls_token", "bos_token"))
    ids["sep"] = find("sep_token", "eos_token")
    missing = [role for role, i in ids.items() if i is None]
    if missing:
        raise ValueError(
            f"The tokenizer has no {' / '.join(missing)} token ({tokenizer.special_tokens_read} name none): "
            "masked-language-model training needs a tokenizer with [MASK], [PAD], [CLS] and [SEP] (or their own "
            "spellings: <mask>, <pad>, <bos>, <eos>)."
        )
    return Vocab(size=tokenizer.get_vocab_size(), **ids)


def build(settings, rank, tokenizer_folder, device):
    """(model on `device`, tokenizer folder, vocab, pieces, held-out pieces). The memory the run needs, then data and
    tokenizer, then the samples: each is checked before the model costs anything."""
    source = get_last_checkpoint(settings["out"]) if settings["resume"] else settings.get("init")
    config = ModernBertConfig.from_pretrained(source) if source is not None else None  # else settings say the size
    check_memory(settings, config, device)
    documents = read_documents(settings.get("data"))
    check_same_data(documents, settings)
    train_docs, held_docs = split_held_out(documents)
    if settings["resume"]:  # a copy: the run removes its checkpoint folders as it saves new ones
        for name in load.TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(tokenizer_folder, name))
    elif source is not None:
        tokenizer_folder = load.resolve(source)
    elif rank == 0 or not dist.is_initialized():
        save_tokenizer(train_tokenizer(train_docs, settings["vocab"]), tokenizer_folder, settings["max_len"])
    if dist.is_initialized() and source is None:  # one tokenizer for all: process 0's, sent to the others
        text = [open(os.path.join(tokenizer_folder, "tokenizer.json")).read() if rank == 0 else None]
        dist.broadcast_object_list(text, src=0)
        if rank != 0:
            save_tokenizer(Tokenizer.from_str(text[0]), tokenizer_folder, settings["max_len"])
    tokenizer = load.load_tokenizer(tokenizer_folder)
    tokenizer.no_padding()
    vocab = read_vocab(tokenizer)
    check_samples(
        settings.get("samples"), tokenizer, config.max_position_embeddings if config else settings["max_len"]
    )
    if source is not None:
        model = ModernBertForMaskedLM.from_pretrained(source).train()
        if settings["max_len"] > model.config.max_position_embeddings:
            raise ValueError(
                f"--max-len {settings['max_len']} is more than {source}'s max_position_embeddings "
                f"{model.config.max_position_embeddings}."
            )
        if settings["resume"]:
            check_same_model(model.config, settings)
    else:
        torch.manual_seed(settings["seed"])
        model = ModernBertForMaskedLM(new_config(settings, vocab))
    model.config.sparse_prediction = settings["sparse_prediction"]  # False: --dense-prediction (config.json too)
    settings.update({flag: getattr(model.config, field) for flag, field in MODEL_FLAGS.items()})
    # --init's vocabulary; a new run records the --vocab asked (the data may give fewer), so its command resumes it
    settings.setdefault("vocab", vocab.size)
    pieces = tokenize(tokenizer, vocab, train_docs, settings["max_len"])
    held_pieces = tokenize(tokenizer, vocab, held_docs, settings["max_len"])
    check_budget(max(map(len, pieces + held_pieces)), settings["batch_tokens"])
    model.to(device)
    if settings.get("compile"):
        model.compile()
    return model, tokenizer_folder, vocab, pieces, held_pieces


def check_same_data(documents, settings):
    """A new run records the sha256 of its documents; a resumed one must read the same text (another text, even at
    the same path, would change every batch)."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.encode() + b"\0")
    if settings.setdefault("data_sha256", digest.hexdigest()) != digest.hexdigest():
        data = " ".join(settings.get("data") or ["this Python's standard-library docstrings"])
        raise ValueError(
            f"--resume: the content of {data} is not the text the run in {settings['out']} was trained on (it "
            "changed since): resume with that text, or start a new run in another --out."
        )


def new_config(settings, vocab):
    """A small ModernBERT: the official architecture (local window 128, global every 3rd layer, its RoPE bases)
    at the size asked for, the vocabulary rounded up to a multiple of 64 as ModernBERT's (50,368 for 50,285)."""
    sizes = {field: settings[flag] for flag, field in MODEL_FLAGS.items()}
    return ModernBertConfig(
        vocab_size=-(-vocab.size // 64) * 64,
        max_position_embeddings=settings["max_len"],
        pad_token_id=vocab.pad,
        cls_token_id=vocab.cls,
        bos_token_id=vocab.cls,
        sep_token_id=vocab.sep,
        eos_token_id=vocab.sep,
        **sizes,
    )


def mixed_precision(device, dtype):
    """What each forward runs in: bf16 autocast (the weights stay fp32) for --dtype bf16, else nothing."""
    dtype = torch.bfloat16 if dtype == "bf16" else None
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ----------------------------------------------------------------------------------------------------
# Resuming: the run's state as trainer_state.json records it, and the optimizer's moments back by parameter name.


def new_state(settings, step_tokens):
    """What trainer_state.json records, as the run goes."""
    return dict(
        log_history=[],
        global_step=0,
        epoch=0.0,
        tokens_seen=0,
        train_seconds=0.0,
        eval_steps=0,
        logging_steps=settings["log_every"],
        save_steps=settings["save_every"],
        max_steps=settings.get("steps") or 0,
        batch_tokens=step_tokens,
    )


def resume_state(state, optimizer, out):
    """The step, log and tokens seen of out's last checkpoint, and the optimizer's moments (build loads weights)."""
    folder = get_last_checkpoint(out)
    path = os.path.join(folder, "trainer_state.json")
    recorded = read_json_file(path)
    fields = {"global_step": int, "epoch": (int, float), "num_input_tokens_seen": int, "log_history": list}
    for name, kind in fields.items():
        value = recorded.get(name) if isinstance(recorded, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool) or (name == "global_step" and value < 0):
            raise damaged(path, f"its {name} is {value!r}")
    if not all(isinstance(entry, dict) for entry in recorded["log_history"]):
        raise damaged(path, "its log_history holds something else than entries")
    state.update(log_history=recorded["log_history"], global_step=recorded["global_step"], epoch=recorded["epoch"])
    seconds = load_optimizer_state(optimizer, folder, recorded["global_step"])
    state.update(tokens_seen=recorded["num_input_tokens_seen"], train_seconds=seconds)


def load_optimizer_state(optimizer, folder, step):
    """The optimizer's moments back from optimizer.safetensors, by parameter name; returns the recorded training
    seconds. A file that does not match the model, or this step, is an error, not a fresh start."""
    from safetensors import SafetensorError, safe_open

    path = os.path.join(folder, "optimizer.safetensors")
    try:
        with safe_open(path, "pt") as f:
            meta, moments = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        saved_step, seconds = int(meta["step"]), float(meta["train_seconds"])
    except KeyError as e:
        raise damaged(path, f"no {e} in its metadata") from None
    except (SafetensorError, ValueError) as e:
        raise damaged(path, str(e)) from None
    if saved_step != step:
        raise damaged(path, f"its step is {saved_step}, trainer_state.json's {step}")
    if not all(t.isfinite().all() for t in moments.values()):
        raise damaged(path, "moments that are not finite")
    for group in optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            m, v = moments.pop(f"{name}.exp_avg", None), moments.pop(f"{name}.exp_avg_sq", None)
            if step == 0 and m is None and v is None:
                continue  # saved before the first step: no moments yet
            if m is None or v is None or m.shape != p.shape or v.shape != p.shape:
                raise ValueError(
                    f"{path} has no state of the right shape for {name}: it does not belong to this model."
                )
            step_count = saved_step if isinstance(optimizer, StableAdamW) else torch.tensor(float(saved_step))
            optimizer.state[p] = {"step": step_count, "exp_avg": m.to(p.device), "exp_avg_sq": v.to(p.device)}
    if moments:
        raise ValueError(f"{path} holds state for parameters this model lacks: {sorted(moments)[:3]}.")
    return seconds


def read_recorded_run(out):
    """The settings of the run in out, as its last checkpoint recorded them in training_args.json."""
    folder = get_last_checkpoint(out)
    if folder is None:
        raise ValueError(
            f"--resume: {out} holds no saved run to continue (no checkpoint-<step> folder with its "
            "trainer_state.json): start the run without --resume."
        )
    missing = [n for n in RUN_FILES if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise damaged(os.path.join(folder, missing[0]), "the file is missing")
    path = os.path.join(folder, "training_args.json")
    recorded = read_json_file(path)
    if not isinstance(recorded, dict):
        raise damaged(path, f"a JSON {type(recorded).__name__}, not an object")
    for name in RECORDED_REQUIRED:
        if recorded.get(name) is None:
            raise damaged(path, f"no {name}")
    for name in SWITCHES:  # a run saved before the switches existed ran the paper's pieces
        recorded.setdefault(name, DEFAULTS[name])
    for name, kind in RECORDED_TYPES.items():
        if recorded.get(name) is not None and not of_kind(recorded[name], kind):
            raise damaged(path, f"its {name} is {recorded[name]!r}, not of type {kind.__name__}")
    return recorded


# What training_args.json holds, beside the flags of DEFAULTS: what the run recorded about itself
RECORDED_TYPES = {name: type(value) for name, value in DEFAULTS.items() if value is not None}
RECORDED_TYPES |= dict(data=list, init=str, minutes=float, warmup_steps=int, train_seconds=float, processes=int)
RECORDED_TYPES |= dict(device=str, dtype=str, compile=bool, samples=list, data_sha256=str)
SWITCHES = ("packing", "sparse_prediction", "optimizer", "schedule")  # the recipe's pieces, each with a classic flag
RECORDED_REQUIRED = [
    n for n in DEFAULTS if n not in ("out", "steps", "warmup_steps", "vocab", *MODEL_FLAGS, *SWITCHES)
]


def of_kind(value, kind):
    """JSON's value as the flag's type: an int is a float too, a bool is not a number, a list holds strings."""
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def damaged(path, what):
    return ValueError(
        f"{path} is damaged ({what}): it is not as train.py writes it. Resume from a copy of the folder, or start a "
        "new run in another --out."
    )


def check_same_model(config, settings):
    for flag, field in MODEL_FLAGS.items():
        if settings.get(flag) is not None and settings[flag] != getattr(config, field):
            raise ValueError(
                f"--resume: {settings['out']}'s model has {field} {getattr(config, field)}, but --{flag} "
                f"{settings[flag]} was given: drop it, or train into another --out."
            )


# ----------------------------------------------------------------------------------------------------
# The run's clock: how far along the run is, which the schedule and the evaluations follow.


class Clock:
    """How far the run is: by optimizer steps (--steps, the default), or by training seconds (--minutes: what is
    left of them after setup, less RESERVE_SECONDS for the end; a resumed run's --minutes add to the seconds
    trained so far). Under torchrun every process uses the mean of their clocks, so all agree on the learning rate
    and the end."""

    def __init__(self, settings, state, world, device, seconds_left):
        self.state, self.device, self.world, self.last_seconds = state, device, world, 0.0
        self.total_steps = settings.get("steps")
        if self.total_steps is None and "train_seconds" not in settings:
            settings["train_seconds"] = state["train_seconds"] + max(seconds_left - RESERVE_SECONDS, 1.0)
        self.total_seconds = settings.get("train_seconds")
        if self.total_steps:
            state["max_steps"] = self.total_steps
        warmup = settings.get("warmup_steps")
        self.warmup_steps = (
            warmup if warmup is not None else round(0.05 * self.total_steps) if self.total_steps else 50
        )
        self.peak, self.cooldown, self.schedule = settings["lr"], settings["cooldown"], settings["schedule"]
        self.classic = classic_flags(settings)

    def progress_after_next_step(self):
        """The fraction of the run done once the next step ends (time: guessing it lasts as long as the last)."""
        if self.total_steps:
            return (self.state["global_step"] + 1) / self.total_steps
        seconds = all_sum(self.state["train_seconds"] + self.last_seconds, self.device) / self.world
        return seconds / self.total_seconds

    def step_done(self, seconds):
        self.last_seconds = seconds
        self.state["train_seconds"] += seconds
        self.state["global_step"] += 1

    def plan(self):
        """What the run will do, in a line: its length, the tokens of a step, where the schedule turns."""
        tokens = f"{self.state['batch_tokens']:,} tokens"
        if self.total_steps:
            length = f"{self.total_steps:,} steps of {tokens}"
            start = round(self.total_steps * (1 - self.cooldown))
            cooldown = f"1-sqrt cooldown from step {start:,} to {self.total_steps:,}"
            linear = f"linear decay to 0 at step {self.total_steps:,}"
        else:
            length = f"steps of {tokens} for {self.total_seconds:,.0f} seconds of training (--minutes)"
            cooldown = f"1-sqrt cooldown over the last {self.cooldown:.0%} of the time"
            linear = "linear decay to 0 at the end of the time"
        if self.state["global_step"]:
            length += f", resumed after step {self.state['global_step']:,}"
        warmup = f" after a {self.warmup_steps:,}-step warmup" if self.warmup_steps else ", no warmup"
        decay = linear if self.schedule == "linear" else cooldown if self.cooldown else "no cooldown"
        classic = f" Classic pieces: {' '.join(self.classic)}." if self.classic else ""
        return f"{length}: lr {self.peak:.2e}{warmup}, {decay}.{classic}"


# ----------------------------------------------------------------------------------------------------
# Many processes: torchrun's environment, sums across processes, and the end.


def setup_processes(settings):
    """(rank, world size, device): torchrun's environment, one GPU per process; else one process. A resumed run
    keeps its number of processes: another would change every step's batches."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(settings.get("device"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)  # under torchrun, the process's own GPU
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(idle_cores())
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if settings.setdefault("processes", world) != world:
        raise ValueError(
            f"--resume: the run in {settings['out']} was trained by {settings['processes']} processes; "
            f"continue it with {settings['processes']}, not {world}."
        )
    return rank, world, device


def idle_cores():
    """Threads for a CPU run: the cores that the 1-minute load average leaves idle, at least one. Each op's
    threads wait for one another, and a thread the OS has parked on a busy machine stalls them all (README.md
    has the numbers). On an idle machine every core is used. OMP_NUM_THREADS, where set, decides."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores - round(os.getloadavg()[0]))


def all_sum(x, device):
    """The sum over all processes of a number (itself when there is one process)."""
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.item()


def end_processes():
    """Every process waits for process 0's save, then leaves the group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Stopping: on a signal (Ctrl-C, a cluster's preemption) after the step in progress, saved; on a loss or weights
# that are no longer finite at once, unsaved.


class Interrupted(Exception):
    """The run stopped on a signal after saving its step; main says so and exits with `code`, 128 + its number."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class StopOnSignal:
    """While training, SIGINT (Ctrl-C) and SIGTERM (how clusters preempt a job) are noted, not acted on: the step in
    progress ends, and before the next one every process learns whether any of them had one (a sum over processes),
    so all stop after the same step, which process 0 saves: weights, optimizer, step and data position of that one
    step. A second signal during the save is noted too; a kill (SIGKILL) cannot be, and loses nothing either (see
    save_run). Outside the loop and its save (setup, the samples) the signals act as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, device):
        self.device, self.noted, self.stopped, self.previous = device, 0, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # the only thread Python gives signals to
            self.previous = {s: signal.signal(s, self.note) for s in self.SIGNALS}
        return self

    def note(self, signum, frame):
        self.noted = self.noted or signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self):
        """Whether any process has had a signal; self.stopped is then (process, signal, world size) of the first."""
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        noted = torch.zeros(world, dtype=torch.int64, device=self.device)
        noted[rank] = self.noted
        if world > 1:
            dist.all_reduce(noted)
        if noted.any():
            process = int(noted.nonzero()[0])
            self.stopped = (process, signal.Signals(int(noted[process])), world)
        return self.stopped is not None

    def raise_if_stopped(self, step, out):
        if self.stopped:
            process, received, world = self.stopped
            where = f" on process {process}" if world > 1 else ""
            message = (
                f"Interrupted by {received.name}{where} after step {step}: saved in {out}; --resume continues it."
            )
            raise Interrupted(message, 128 + received)


def check_finite(loss, lr, step, out):
    """A loss that is not finite stops the run at its step, before anything of that step is saved."""
    if not math.isfinite(loss):
        raise diverged(f"the loss is {loss}", step, lr, out)


def diverged(what, step, lr, out):
    last = get_last_checkpoint(out)
    kept = f"keeps {os.path.basename(last)}" if last else "holds no checkpoint of it"
    return ValueError(
        f"step {step}: {what}, at learning rate {lr:.3g}: the run stops here, and {out} {kept}. Lower --lr or "
        "--weight-decay, or check the data."
    )


# ----------------------------------------------------------------------------------------------------
# The output folder. Each save writes a whole checkpoint into a new folder, checkpoint-<step> (as transformers'
# Trainer does), its trainer_state.json last: a checkpoint folder that has one is whole. Then its model, tokenizer
# and trainer_state.json are linked at the top of --out, for load.py, transformers and --init; last, the previous
# checkpoint goes. So a kill at any moment leaves the last whole checkpoint, which --resume takes.
#
#   trained-modernbert/             the last saved model: load.py, transformers' from_pretrained
#     config.json  model.safetensors  tokenizer.json  tokenizer_config.json  special_tokens_map.json
#     trainer_state.json            the loss curve, as transformers' Trainer writes it
#     checkpoint-1440/              what --resume reads: the same files (linked, not copied), and
#       optimizer.safetensors         the optimizer's moments, its step and the seconds trained
#       training_args.json            the run's settings
#     .lock                         while a run writes the folder

RUN_FILES = ("trainer_state.json", "training_args.json", "optimizer.safetensors")
PUBLISHED = ("config.json", "model.safetensors", *load.TOKENIZER_FILES, "trainer_state.json")  # trainer_state last
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
LOCK = ".lock"


def save_run(out, model, optimizer, state, settings, tokenizer_folder):
    """The run at its step, as out/checkpoint-<step>, made the folder's model; then the checkpoint before it goes.
    The same step saved again (a run's end just after its last save) rewrites its two JSON files only, each at
    once. A save that fails is one error, and leaves the last whole checkpoint."""
    from safetensors import SafetensorError

    step, lr = state["global_step"], optimizer.param_groups[0]["lr"]
    if not all(p.isfinite().all() for p in model.parameters()):
        raise diverged("the weights are no longer finite", step, lr, out)
    folder = os.path.join(out, f"checkpoint-{step}")
    try:
        if not is_whole(folder):
            shutil.rmtree(folder, ignore_errors=True)  # what a killed save of this step left
            load.save_with_tokenizer(model, folder, tokenizer_folder)  # config.json + model.safetensors appear at once
            save_optimizer_state(optimizer, state, folder)
        write_json(os.path.join(folder, "training_args.json"), {k: v for k, v in settings.items() if k != "resume"})
        write_json(os.path.join(folder, "trainer_state.json"), trainer_state(state))  # now the checkpoint is whole
        publish(folder, out)
    except (OSError, SafetensorError) as e:
        if not is_whole(folder):
            shutil.rmtree(folder, ignore_errors=True)
        last = get_last_checkpoint(out)
        raise OSError(
            f"saving step {step} in {out} failed ({e}); {os.path.basename(last) if last else 'no checkpoint'} is "
            "the last whole one there."
        ) from None
    for name in os.listdir(out):
        if CHECKPOINT.fullmatch(name) and name != os.path.basename(folder):
            remove_checkpoint(os.path.join(out, name))


def save_optimizer_state(optimizer, state, folder):
    """The optimizer's moments by parameter name, with its step and the seconds trained, in optimizer.safetensors."""
    from safetensors.torch import save_file

    moments = {}
    for group in optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            if optimizer.state[p]:
                moments[f"{name}.exp_avg"] = optimizer.state[p]["exp_avg"].contiguous()
                moments[f"{name}.exp_avg_sq"] = optimizer.state[p]["exp_avg_sq"].contiguous()
    meta = {"step": str(state["global_step"]), "train_seconds": repr(state["train_seconds"])}
    path = os.path.join(folder, "optimizer.safetensors")
    save_file(moments, path, metadata=meta)
    os.chmod(path, 0o666 & ~current_umask())  # safetensors makes its files private; a checkpoint is readable


def publish(folder, out):
    """The checkpoint's model, tokenizer and trainer_state.json at the top of out too, each linked (copied where
    the file system has no links) under a temporary name, then renamed over the one there."""
    for name in PUBLISHED:
        source, temporary = os.path.join(folder, name), os.path.join(out, ".saving-" + name)
        target = os.path.join(out, name)
        if os.path.isfile(source) and not (os.path.exists(target) and os.path.samefile(source, target)):
            # (renaming a link over the same file leaves both names: POSIX rename does nothing then)
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)
            try:
                os.link(source, temporary)
            except OSError:
                shutil.copyfile(source, temporary)
            os.replace(temporary, target)


def get_last_checkpoint(out):
    """The folder of out's last whole checkpoint, or None: transformers' get_last_checkpoint, whole ones only."""
    steps = [int(m[1]) for name in listdir(out) if (m := CHECKPOINT.fullmatch(name)) and is_whole(out, name)]
    return os.path.join(out, f"checkpoint-{max(steps)}") if steps else None


def is_whole(*folder):
    return os.path.isfile(os.path.join(*folder, "trainer_state.json"))


def listdir(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def remove_checkpoint(folder):
    """Its trainer_state.json first: a kill in the middle leaves a folder that nothing takes for a checkpoint."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, "trainer_state.json"))
    shutil.rmtree(folder, ignore_errors=True)


def left_by_a_killed_run(out, name):
    """A file of out that a run killed in the middle of writing left there: its lock, a temporary .saving-*
    file or folder, or a checkpoint folder that is not whole."""
    return name == LOCK or name.startswith(".saving-") or bool(CHECKPOINT.fullmatch(name) and not is_whole(out, name))


def tidy(out):
    """Removes what killed runs left in out (this run holds its lock): their temporary files and folders, checkpoints
    that are not whole, and any before the last whole one. Says so in one line."""
    last = get_last_checkpoint(out)
    left = [n for n in listdir(out) if n != LOCK and left_by_a_killed_run(out, n)]
    left += [n for n in listdir(out) if CHECKPOINT.fullmatch(n) and is_whole(out, n) and os.path.join(out, n) != last]
    if last:
        left += [os.path.join(os.path.basename(last), n) for n in listdir(last) if n.startswith(".saving-")]
    for name in left:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            remove_checkpoint(path)
        else:
            os.remove(path)
    if left:
        print(f"{out}: removed what a killed run left there: {', '.join(left)}.")


@contextlib.contextmanager
def one_writer(out, rank):
    """Holds out/.lock while this run writes out (process 0, which saves), so that a second run into it is refused
    at once. The lock is the operating system's (flock): a killed run's is free again, and the next run takes it
    over, saying so. A new folder that the run leaves empty (an error before any save) is removed."""
    if rank != 0 or os.name == "nt":  # Windows has no flock: no lock there
        yield
        return
    made = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK)
    lock = take_lock(path, out)
    try:
        tidy(out)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):  # before unlocking: a run that opened it meanwhile opens anew
            os.remove(path)
        os.close(lock)
        if made and not os.listdir(out):
            os.rmdir(out)


def take_lock(path, out):
    """The lock file's descriptor, locked; the file names the process holding it, for a run refused."""
    import fcntl

    while True:
        lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise in_use(out, lock) from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(lock), os.stat(path)):
                break
        os.close(lock)  # the run that held it removed it as this one opened it: open the new one
    if previous := os.read(lock, 200).decode(errors="replace"):
        print(f"{out}: taking over its lock, left by {previous}, which ended without releasing it.")
    os.ftruncate(lock, 0)
    os.pwrite(lock, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return lock


def check_not_in_use(out):
    """The error of a run into out while another writes it, before anything else (nothing written: one_writer
    takes the lock later)."""
    if os.name == "nt":  # Windows has no flock: no lock there
        return
    import fcntl

    try:
        lock = os.open(os.path.join(out, LOCK), os.O_RDONLY)
    except OSError:
        return  # no lock file: no run there
    try:
        fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise in_use(out, lock) from None
    os.close(lock)


def in_use(out, lock):
    holder = os.read(lock, 200).decode(errors="replace") or "another run"
    os.close(lock)
    return ValueError(
        f"--out {out} is in use by {holder}: one run at a time writes a folder. Wait for it to end, or use another "
        "--out."
    )


def trainer_state(state):
    """trainer_state.json with the fields of transformers' TrainerState (it loads with TrainerState.load_from_json)."""
    return {
        "best_global_step": None,
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": state["epoch"],
        "eval_steps": state["eval_steps"],
        "global_step": state["global_step"],
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": state["log_history"],
        "logging_steps": state["logging_steps"],
        "max_steps": state["max_steps"],
        "num_input_tokens_seen": state["tokens_seen"],
        "num_train_epochs": math.ceil(state["epoch"]) or 1,
        "save_steps": state["save_steps"],
        "stateful_callbacks": {},
        "total_flos": 0,
        "train_batch_size": state["batch_tokens"],
        "trial_name": None,
        "trial_params": None,
    }


def write_json(path, content):
    """Written beside `path` under a temporary name, then renamed over it: a reader finds the old file or the new."""
    temporary = os.path.join(os.path.dirname(path), ".saving-" + os.path.basename(path))
    with open(temporary, "w") as f:
        json.dump(content, f, indent=2)
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------------
# Logging: the run's plan, the loss curve, the evaluations, and the result against a baseline.


class Log:
    """The loss curve, in trainer_state.json's log_history (as transformers' Trainer logs it) and on the screen:
    a progress bar where the output is a terminal, a line every --log-every steps and at each evaluation."""

    def __init__(self, settings, state, show, baseline=None):
        self.state, self.show, self.every, self.out = state, show, settings["log_every"], settings["out"]
        self.baseline = baseline  # recorded beside each evaluation, so a plot of the run can draw it
        self.evals, self.evals_passed = settings["evals"], 0
        self.vocab_asked = settings.get("vocab") or 0
        self.dtype = "bf16 autocast" if settings.get("dtype") == "bf16" else "fp32"
        self.window = []  # (loss, tokens, seconds) of the steps since the last line
        terminal = show and sys.stderr.isatty()
        self.bar = tqdm(total=1000, disable=not terminal, bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]")

    def start(self, pieces, held_pieces, vocab, model, device, world, clock):
        """What the run trains, and what it will do."""
        n_params = sum(p.numel() for p in model.parameters())
        processes = f" x {world} processes" if world > 1 else ""
        fewer = f" (the data gave no more of the --vocab {self.vocab_asked:,} asked)" * (vocab.size < self.vocab_asked)
        self.write(
            f"{len(pieces):,} training pieces ({sum(map(len, pieces)):,} tokens), {len(held_pieces):,} held out; "
            f"vocabulary {vocab.size:,}{fewer}; {n_params / 1e6:.1f}M parameters on {device}{processes}, {self.dtype}"
        )
        self.write(clock.plan())

    def step(self, loss, lr, tokens, progress, seconds):
        self.window.append((loss, tokens, seconds))
        self.bar.n = int(1000 * min(progress, 1.0))
        self.bar.set_postfix_str(
            f"step {self.state['global_step']}, loss {loss:.3f}, lr {lr:.2e}, {tokens / seconds:,.0f} tok/s"
        )
        if self.state["global_step"] % self.every == 0:
            self.line(lr)
        self.lr = lr

    def line(self, lr):
        losses, tokens, seconds = zip(*self.window)
        entry = {
            "epoch": round(self.state["epoch"], 4),
            "learning_rate": lr,
            "loss": round(sum(losses) / len(losses), 4),
        }
        entry |= {"step": self.state["global_step"], "tokens_per_second": round(sum(tokens) / sum(seconds))}
        self.state["log_history"].append(entry)
        self.window = []
        self.write(
            f"step {entry['step']:>5}  loss {entry['loss']:.3f}  lr {lr:.2e}  {entry['tokens_per_second']:>6,} tok/s"
        )

    def eval_due(self, progress):
        """Whether the run has passed another of its --evals points since the last evaluation (a resumed run starts
        part way: one evaluation, not one per point passed). The end has its own, after the loop."""
        passed = math.floor(progress * self.evals + 1e-9)
        due = passed > self.evals_passed and progress < 1
        self.evals_passed = max(self.evals_passed, passed)
        return due

    def eval(self, loss, accuracy):
        entry = {
            "epoch": round(self.state["epoch"], 4),
            "eval_accuracy": round(accuracy, 4),
            "eval_loss": round(loss, 4),
        }
        if self.baseline is not None:
            entry["eval_most_frequent_token_accuracy"] = round(self.baseline, 4)
        self.state["log_history"].append({**entry, "step": self.state["global_step"]})
        self.write(
            f"step {self.state['global_step']:>5}  held-out loss {loss:.3f}  masked-token accuracy {accuracy:.3f}"
        )

    def close(self):
        if self.window:
            self.line(self.lr)
        self.bar.close()

    def result(self, accuracy, baseline, top_token, seconds):
        """The held-out accuracy against always answering the most frequent token, after the folder is saved."""
        if not self.show:
            return
        top = load.shown(load.load_tokenizer(self.out).id_to_token(top_token))
        print(
            f"held-out masked-token accuracy {accuracy:.3f}; always answering the most frequent token ({top}): "
            f"{baseline:.3f}{f' ({accuracy / baseline:.1f}x)' if baseline else ''}. {self.state['global_step']} "
            f"steps, {seconds / 60:.1f} minutes."
        )

    def write(self, line):
        if self.show:
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()


def most_frequent_token_accuracy(pieces, batches):
    """The baseline: the accuracy of always answering the training data's most frequent token."""
    counts = torch.bincount(torch.tensor([t for p in pieces for t in p]))
    top = int(counts.argmax())
    targets = torch.cat([b.labels[b.labels != IGNORE] for b in batches])
    return top, (targets == top).float().mean().item()


# ----------------------------------------------------------------------------------------------------
# Samples: fill-mask on the saved folder at the end of a run.

SAMPLES = [  # {mask} is the tokenizer's mask token
    "Return the {mask} of the list.",
    "Raise ValueError if the {mask} is not found.",
    "If the file does not {mask}, it is created.",
    "This module provides {mask} for working with dates and times.",
]


def samples(folder, texts=None):
    """Fill-mask on the saved folder, as `python load.py --model folder` prints it."""
    tokenizer = load.load_tokenizer(folder)
    texts = sample_texts(texts, load.mask_token(tokenizer))
    model = load.load_model(folder)
    return load.format_results(tokenizer, texts, load.fill_mask(model, tokenizer, texts, top_k=5))


def sample_texts(texts, mask):
    """--samples with [MASK] written as this tokenizer's mask (or SAMPLES); an error names one without a mask."""
    texts = [t.replace("[MASK]", mask) for t in texts] if texts else [s.format(mask=mask) for s in SAMPLES]
    load.check_masks(texts, mask)
    return texts


# ----------------------------------------------------------------------------------------------------
# The command line: the settings of a new run (DEFAULTS, at the top) or a resumed one, checked before anything is
# written.

# What a resumed run may change; everything else it continues as recorded (an explicit different value is an error).
RESUMABLE_CHANGES = ("steps", "minutes", "device", "dtype", "compile", "save_every", "log_every", "evals", "samples")
RESERVE_SECONDS = 30  # of --minutes, kept for the last evaluation, saving and the samples
OFF_FLAGS = {"packing": "--no-packing", "sparse_prediction": "--dense-prediction"}  # the flag turns the setting off
OPTIMIZERS, SCHEDULES = ("stableadamw", "adamw"), ("wsd", "linear")  # the paper's first, then the classic


def classic_flags(settings):
    """The flags that switch this run's pieces of the recipe to their classic counterparts, for its plan line."""
    flags = [flag for name, flag in OFF_FLAGS.items() if settings.get(name) is False]
    changed = [name for name in ("mask_rate", "optimizer", "schedule") if settings[name] != DEFAULTS[name]]
    return flags + [f"--{name.replace('_', '-')} {settings[name]}" for name in changed]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train a ModernBERT masked language model with the paper's recipe (see the top of train.py). "
        f"Without arguments: a small model on this Python's standard-library docstrings, offline, {DEFAULTS['steps']} "
        "steps: the same run on every machine.",
        argument_default=None,
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help=".txt files, or folders (every .txt file under them); blank lines separate documents "
        "(default: the docstrings of this Python's standard library)",
    )
    p.add_argument(
        "--init", metavar="HUB_ID_OR_FOLDER", help="continue pretraining this checkpoint, with its tokenizer"
    )
    p.add_argument("--out", help=f"the output folder: new or empty, or a run to --resume (default: {DEFAULTS['out']})")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=whole, help=f"optimizer steps (default: {DEFAULTS['steps']})")
    budget.add_argument("--minutes", type=float, help="instead of --steps: the whole run's wall time, setup included")
    p.add_argument(
        "--resume", action="store_true", help="continue the run saved in --out: its step, optimizer, schedule"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if there is a GPU; under torchrun, one each)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16: autocast, weights stay fp32 (default: fp32)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile each encoder layer")
    size = p.add_argument_group("model size (a new model; --init and --resume take the checkpoint's)")
    size.add_argument("--layers", type=whole, help="encoder layers (default: 4; every 3rd from 0 is global)")
    size.add_argument("--hidden", type=whole, help="hidden size (default: 256)")
    size.add_argument("--heads", type=whole, help="attention heads (default: 4)")
    size.add_argument("--intermediate", type=whole, help="GeGLU intermediate size (default: 384)")
    size.add_argument("--vocab", type=whole, help="BPE vocabulary to train (default: 8192)")
    run = p.add_argument_group("the recipe")
    run.add_argument(
        "--max-len", type=whole, help="tokens per piece: longer documents are cut (default 512; a new model's longest)"
    )
    run.add_argument("--batch-tokens", type=whole, help="tokens per packed batch, per process (default: 1024)")
    run.add_argument("--accum", type=whole, help="packed batches per process per optimizer step (default: 1)")
    run.add_argument("--lr", type=float, help="peak learning rate (default: 1e-3)")
    run.add_argument(
        "--weight-decay", type=float, help="fully decoupled: the shrink per step at peak lr (default 3e-4)"
    )
    run.add_argument("--warmup-steps", type=whole, help="linear warmup (default: 5%% of --steps; 50 with --minutes)")
    run.add_argument(
        "--cooldown", type=float, help="the final fraction of the run spent in 1-sqrt decay (default: 0.2; wsd only)"
    )
    run.add_argument("--mask-rate", type=float, help="fraction of tokens masked (default: 0.3; BERT's: 0.15)")
    run.add_argument("--seed", type=whole, help="model init, data order and masks (default: 0)")
    run.add_argument("--log-every", type=whole, help="steps between loss lines (default: 10)")
    run.add_argument(
        "--evals", type=whole, help="held-out evaluations over the run, the last at the end (default: 10)"
    )
    run.add_argument("--save-every", type=whole, help="steps between saves; 0: at the end only (default: 0)")
    run.add_argument("--samples", nargs="+", metavar="TEXT", help="fill-mask texts for the end ([MASK] is replaced)")
    classic = p.add_argument_group(
        "switches: a piece of the recipe to its classic counterpart (with --mask-rate 0.15)"
    )
    classic.add_argument(
        "--no-packing",
        dest="packing",
        action="store_false",
        default=None,
        help="one document a row, padded to --max-len: --batch-tokens // --max-len documents a batch (the held-out "
        "batches stay packed)",
    )
    classic.add_argument(
        "--dense-prediction",
        dest="sparse_prediction",
        action="store_false",
        default=None,
        help="every position through the head and decoder, not only the masked ones (the loss is over those still)",
    )
    classic.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="adamw: torch's AdamW, its weight decay --weight-decay / --lr (the same shrink at the peak), gradients "
        "clipped to norm 1.0 (default: stableadamw)",
    )
    classic.add_argument(
        "--schedule", choices=SCHEDULES, help="linear: the same warmup, then linear decay to 0 (default: wsd)"
    )
    return p.parse_args(argv)


def whole(text):
    """An int flag's value: 2048, or 1e6 (a float that is a whole number)."""
    with contextlib.suppress(ValueError):
        return int(text)
    with contextlib.suppress(ValueError):
        if float(text).is_integer():
            return int(float(text))
    raise argparse.ArgumentTypeError(f"{text} is not a whole number")


def settle(args):
    """The run's settings: a new run's defaults, or a resumed run's recorded settings. Errors before any writing."""
    given = {k: v for k, v in vars(args).items() if v is not None and k != "resume"}
    out = given.get("out", DEFAULTS["out"])
    if not out:
        raise ValueError("--out is empty (an unset shell variable?): name the output folder.")
    if "data" in given:  # recorded for --resume, which may start elsewhere
        given["data"] = [os.path.abspath(p) for p in given["data"]]
    if args.resume:
        recorded = read_recorded_run(out)
        for k, v in given.items():
            if k not in RESUMABLE_CHANGES and k != "out" and v != recorded.get(k):
                flag = "--" + k.replace("_", "-")
                was, now = f"with {flag} {recorded.get(k)}", f"{flag} {v}"
                if k in OFF_FLAGS:  # an on/off piece, named by the flag that turns it off
                    was, now = f"without {OFF_FLAGS[k]}", OFF_FLAGS[k]
                raise ValueError(
                    f"--resume continues the run in {out} as it was started, {was}; {now} was given. Drop it, or "
                    "start a new run in another --out."
                )
        if "steps" in given or "minutes" in given:  # a new end for the run
            for name in ("steps", "minutes", "train_seconds"):
                recorded.pop(name, None)
        settings = {**recorded, **given, "resume": True}
    else:
        check_new_out(out)
        if "init" in given and (clash := [k for k in (*MODEL_FLAGS, "vocab") if k in given]):
            raise ValueError(f"--init {given['init']} fixes the model's size and tokenizer: drop --{clash[0]}.")
        settings = {**DEFAULTS, **given, "resume": False}
        if "init" in given:  # the checkpoint's size; build() records it
            for name in (*MODEL_FLAGS, "vocab"):
                settings.pop(name)
        if "minutes" in given:  # the clock sizes the run instead
            settings.pop("steps")
    check_settings(settings)
    check_writable(out)  # last: it makes (and removes) a folder
    return settings


def check_settings(settings):
    """Every number in range, for a new run and a resumed one alike (a resumed run may set a new end), and no
    setting that cannot train: a mask rate that masks nothing, a weight decay that zeroes the weights."""
    for name in ("minutes", "lr", "weight_decay", "cooldown", "mask_rate"):
        if settings.get(name) is not None and not math.isfinite(settings[name]):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {settings[name]}.")
    positive = ("minutes", "steps", "batch_tokens", "accum", "layers", "hidden", "heads", "vocab", "lr", "log_every")
    rules = {name: (lambda v: v > 0, "positive") for name in (*positive, "evals")}
    rules |= {name: (lambda v: v >= 0, "0 or more") for name in ("warmup_steps", "save_every")}
    rules["max_len"] = (lambda v: v > 2, "more than 2 ([CLS] and [SEP] take two tokens)")
    rules["mask_rate"] = (lambda v: 0 < v < 1, "between 0 and 1")
    rules["cooldown"] = (lambda v: 0 <= v <= 1, "from 0 to 1")
    # fully decoupled: each step multiplies the weights by 1 - weight_decay at the peak learning rate
    rules["weight_decay"] = (lambda v: 0 <= v < 1, "at least 0 and less than 1 (the shrink of a step at peak lr)")
    rules["seed"] = (lambda v: 0 <= v < 2**32, "from 0 to 2**32 - 1")
    rules["optimizer"] = (lambda v: v in OPTIMIZERS, " or ".join(OPTIMIZERS))
    rules["schedule"] = (lambda v: v in SCHEDULES, " or ".join(SCHEDULES))
    for name, (ok, words) in rules.items():
        if settings.get(name) is not None and not ok(settings[name]):
            raise ValueError(f"--{name.replace('_', '-')} must be {words}, got {settings[name]}.")
    rate, budget = settings["mask_rate"], settings["batch_tokens"]
    if rate * budget < 1:
        raise ValueError(
            f"--mask-rate {rate} masks {rate * budget:.2g} of a batch's {budget:,} tokens on average: nothing to "
            f"learn from. Give at least 1/{budget} = {1 / budget:.2g} (the recipe's is {DEFAULTS['mask_rate']})."
        )
    if not settings["packing"] and settings["batch_tokens"] < settings["max_len"]:
        raise ValueError(
            f"--no-packing puts each document in a row of --max-len {settings['max_len']} tokens: --batch-tokens "
            f"{budget} cannot hold one row. Give at least {settings['max_len']}."
        )
    if settings.get("vocab") is not None and not settings.get("init"):  # a tokenizer trained here
        check_vocab(settings["vocab"])
    return settings


MOST_VOCAB = 1_000_000  # about 4x the largest vocabulary in use (Gemma's, 262,144)


def check_vocab(size):
    """A vocabulary the BPE trainer can reach: its bytes and special tokens at least, MOST_VOCAB at most (the trainer
    reserves memory for the size asked, and aborts the whole process, no error to catch, where it cannot)."""
    least = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if size < least:
        raise ValueError(
            f"--vocab {size} is less than the {least} tokens a trained tokenizer starts with (256 bytes and "
            f"{len(SPECIAL_TOKENS)} special tokens): give at least {least}."
        )
    if size > MOST_VOCAB:
        raise ValueError(
            f"--vocab {size} is more than {MOST_VOCAB:,}, the most this trains: about four times the largest "
            "vocabulary in use, and the tokenizer trainer reserves memory for every token asked."
        )


def check_writable(out):
    """An --out that cannot be written is an error before the run, not after it: a folder is made and removed in
    --out and beside it (where a save is prepared), or in the nearest folder above that exists; nothing is left."""
    folder = os.path.abspath(out)
    for place in (folder, os.path.dirname(folder)):
        while not os.path.exists(place):
            place = os.path.dirname(place)
        if not os.path.isdir(place):
            raise ValueError(f"--out {out}: {place} is a file, not a folder: give a folder.")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=place))
        except OSError as e:
            raise ValueError(
                f"--out {out} cannot be written ({e.strerror} in {place}): give a folder you can write."
            ) from None


def check_new_out(out):
    if os.path.isfile(out):
        raise ValueError(f"--out {out} is a file: give a new or empty folder.")
    if get_last_checkpoint(out):
        raise ValueError(
            f"--out {out} already holds a training run: add --resume to continue it, or use another --out."
        )
    if names := [n for n in listdir(out) if not left_by_a_killed_run(out, n)]:  # those a next run removes (tidy)
        raise ValueError(f"--out {out} holds other files ({', '.join(names[:3])}, ...): give a new or empty folder.")


def main(argv=None):
    """Trains, then prints fill-mask samples from the saved folder. A mistake the user can fix (no text, a
    tokenizer without a mask token, a budget too small, an --out in the way) is one line and exit status 2,
    before anything is written."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        if rank == 0:
            check_not_in_use(args.out or DEFAULTS["out"])
        settings = settle(args)
        with one_writer(settings["out"], rank):
            train(settings)
        if rank == 0:
            print(samples(settings["out"], settings.get("samples")))
    except Interrupted as e:  # SIGINT or SIGTERM in the loop: its step is saved
        if rank == 0:
            print(e, file=sys.stderr)
        end_processes()  # the others wait for this line: torchrun ends them all once one exits
        return e.code
    except KeyboardInterrupt:  # Ctrl-C outside the loop: during setup, or the samples after the save
        print("Interrupted by SIGINT outside the training loop: nothing more was saved.", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ValueError, OSError, RuntimeError) as e:
        if rank == 0 or isinstance(e, RuntimeError):  # a process that fails alone says so, naming itself
            print(f"error: {f'process {rank}: ' if world > 1 else ''}{e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # idle_cores() chose for this run only
        if dist.is_initialized():  # a run that failed: its processes leave the group without waiting
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
