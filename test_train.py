"""Tests of train.py, in its order: documents, the tokenizer, best-fit packing (no attention across documents),
masking, StableAdamW (against torch's AdamW, its own formula and optimi's implementation), the schedule, the training
step (the same losses as transformers' ModernBertForMaskedLM in this loop), and each piece's classic switch beside it
(no packing, AdamW with clipping, the linear schedule, dense prediction); then the plumbing: the run's plan (a fixed
number of steps by default), the output folder in load.py and transformers, kept whole under kills (SIGKILL anywhere,
inside saves too), one writer at a time, a loss that is not finite; --resume after SIGINT and SIGTERM bit for bit,
other data and damaged checkpoints refused; two processes against one, and one of them interrupted or killed; and
the one-line errors. Tiny models. Tests marked slow run real training runs, forked runs or subprocesses; the rest take
seconds.
"""

import contextlib
import glob
import importlib.util
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import pytest
import torch
from tqdm import tqdm

import load
import modernbert as mb
import train
from conftest import TINY as TINY_MODEL

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    import transformers

    transformers.logging.set_verbosity_error()
except ImportError:
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers (the oracle) is not installed")
needs_optimi = pytest.mark.skipif(
    importlib.util.find_spec("optimi") is None, reason="torch-optimi (StableAdamW's reference) is not installed"
)

# A tiny model and a small budget, so a run of a few steps takes seconds.
TINY = ["--layers", "2", "--hidden", "64", "--heads", "2", "--intermediate", "96", "--vocab", "512"]
TINY += ["--max-len", "128", "--batch-tokens", "512", "--log-every", "1", "--evals", "1", "--samples", "A [MASK]."]
TINY_SHAPE = dict(layers=2, hidden=64, intermediate=96, vocab=512)  # TINY's model, for the memory estimate
VOCAB = train.Vocab(size=500, mask=4, pad=3, cls=1, sep=2)
# test_modernbert's tiny model (its +-8 window is crossed by the documents here) with weights 5x the official
# init's spread, so that every layer moves the stream visibly
SMALL = {**TINY_MODEL, "vocab_size": VOCAB.size, "pad_token_id": VOCAB.pad, "initializer_range": 0.1}


def docstrings_file(folder, n):
    """n docstrings of the standard library, one document each, as a .txt file."""
    path = folder / "docs.txt"
    path.write_text("\n\n".join(d.replace("\n\n", "\n") for d in itertools.islice(train.stdlib_docstrings(), n)))
    return str(path)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return docstrings_file(tmp_path_factory.mktemp("data"), 400)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file):
    """A folder trained for 4 steps, and what train.main printed."""
    out = str(tmp_path_factory.mktemp("run") / "out")
    assert train.main(["--data", text_file, "--out", out, "--steps", "4", *TINY]) == 0
    return out


@pytest.fixture(scope="module", autouse=True)
def same_threads():
    """One thread for every run (train.py picks a count from the load average), so that runs compared bit for bit
    do the same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: as fast as two, and not slowed down by a busy machine (see idle_cores)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "idle_cores", lambda: 1)
        yield
    torch.set_num_threads(threads)


def random_pieces(n, seed=0, low=10, high=100):
    """n documents of random token ids, each [CLS] ... [SEP]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [[VOCAB.cls, *torch.randint(5, VOCAB.size, (k - 2,), generator=g).tolist(), VOCAB.sep] for k in lengths]


def motif_pieces(n, seed=0):
    """n documents that each repeat a short random motif: a masked token is predictable from its own document
    only, so attention matters, and across documents it misleads."""
    g = torch.Generator().manual_seed(seed)
    pieces = []
    for length in torch.randint(20, 120, (n,), generator=g).tolist():
        motif = torch.randint(5, VOCAB.size, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        pieces.append([VOCAB.cls, *(motif * 40)[: length - 2], VOCAB.sep])
    return pieces


def settings(**overrides):
    return {"seed": 0, "batch_tokens": 512, "max_len": 128, **overrides}


@pytest.fixture(scope="module")
def small_text_file(tmp_path_factory):
    """60 docstrings: a run of one small layer on them takes a fraction of a second."""
    return docstrings_file(tmp_path_factory.mktemp("small"), 60)


# One layer of width 64 (the runs that are killed, interrupted or restarted many times)
ONE_LAYER = ["--layers", "1", "--hidden", "64", "--heads", "2", "--intermediate", "96", "--vocab", "300"]
ONE_LAYER += ["--max-len", "64", "--batch-tokens", "256", "--log-every", "1", "--evals", "1", "--samples", "A [MASK]."]


def fork(run):
    """Starts run() in a forked copy of this process (a run that may be killed, or kill itself); returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        # tqdm's lock is shared with every process forked from this one: a kill while holding it would hang the rest
        tqdm.set_lock(threading.RLock())
        code = 1
        try:
            code = run()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    return pid


def exit_status(pid):
    """What the forked run returned, or minus the signal that ended it."""
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# What a save may change in the file system, each a point where a kill can land
FILE_CHANGES = [(os, n) for n in ("replace", "rename", "remove", "unlink", "link", "rmdir", "mkdir")]
FILE_CHANGES += [(shutil, "copyfile"), (json, "dump")]


def kill_inside_saves(at):
    """From now on, in this (forked) process: SIGKILL just before the `at`-th change (0, 1, ...) that save_run makes
    to the file system, counting over all its saves."""
    from safetensors import torch as safetensors_torch

    count, saving = itertools.count(), [False]
    for module, name in [*FILE_CHANGES, (safetensors_torch, "save_file")]:

        def change(*args, _original=getattr(module, name), **kwargs):
            if saving[0] and next(count) == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return _original(*args, **kwargs)

        setattr(module, name, change)
    save_run = train.save_run

    def watched_save(*args):
        saving[0] = True
        try:
            return save_run(*args)
        finally:
            saving[0] = False

    train.save_run = watched_save


def resumed(out):
    """(step, weights, the optimizer's moments) as --resume finds them in `out`, read as train.py reads them."""
    settings = train.settle(train.parse_args(["--out", out, "--resume"]))
    with tempfile.TemporaryDirectory() as tokenizer_folder:
        model, *_ = train.build(settings, 0, tokenizer_folder, torch.device("cpu"))
    optimizer = train.new_optimizer(model, settings)
    state = train.new_state(settings, settings["batch_tokens"])
    train.resume_state(state, optimizer, out)
    return state["global_step"], model.state_dict(), moments(optimizer)


def moments(optimizer):
    """The optimizer's moments by parameter name, copied."""
    return {
        name: (optimizer.state[p]["exp_avg"].clone(), optimizer.state[p]["exp_avg_sq"].clone())
        for group in optimizer.param_groups
        for name, p in zip(group["names"], group["params"])
        if optimizer.state[p]
    }


def equal(a, b):
    """Two dicts of tensors, or of tuples of tensors, bit for bit."""

    def flat(d):
        return {(k, i): t for k, v in d.items() for i, t in enumerate(v if isinstance(v, tuple) else (v,))}

    a, b = flat(a), flat(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def files_named(folder, name):
    """The files called `name` anywhere in `folder` (the run's files, wherever the layout puts them)."""
    return glob.glob(os.path.join(folder, "**", name), recursive=True)


def one_line(err):
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ----------------------------------------------------------------------------------------------------
# Documents


def test_documents_are_paragraphs_of_files_or_stdlib_docstrings_and_every_50th_is_held_out(tmp_path):
    (tmp_path / "a.txt").write_text("one\nstill one\n\n  \ntwo\n\n\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("three")
    (tmp_path / "sub" / "skipped.md").write_text("not read in a folder")
    assert train.read_documents([str(tmp_path)]) == ["one\nstill one", "two", "three"]
    docs = list(itertools.islice(train.stdlib_docstrings(), 50))
    assert len(docs) == 50 and all(isinstance(d, str) and d for d in docs)
    training, held_out = train.split_held_out([f"doc {i}" for i in range(100)] + ["doc 0"])
    assert held_out == ["doc 49", "doc 99"] and len(training) == 98 and not set(training) & set(held_out)


# ----------------------------------------------------------------------------------------------------
# The tokenizer


def test_the_tokenizer_wraps_pieces_in_cls_and_sep_and_its_mask_takes_the_space_before_it(tmp_path):
    """A BPE trained here, read back as load.py reads a checkpoint's: [CLS] text [SEP]; "is [MASK]." is the words
    around the mask; a long document becomes pieces of at most max_len tokens, each wrapped, none of its text lost."""
    train.save_tokenizer(
        train.train_tokenizer(list(itertools.islice(train.stdlib_docstrings(), 200)), 400), tmp_path, 64
    )
    tokenizer = load.load_tokenizer(str(tmp_path))
    tokenizer.no_padding()
    vocab = train.read_vocab(tokenizer)
    assert [vocab.mask, vocab.pad, vocab.cls, vocab.sep] == [
        tokenizer.token_to_id(t) for t in ("[MASK]", "[PAD]", "[CLS]", "[SEP]")
    ]
    assert vocab.size == tokenizer.get_vocab_size() == 400

    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False).ids

    assert tokenizer.encode("Return it.").ids == [vocab.cls, *ids("Return it."), vocab.sep]
    assert ids("It is [MASK].") == [*ids("It is"), vocab.mask, *ids(".")]
    long = " ".join(f"word{i}" for i in range(100))
    pieces = train.tokenize(tokenizer, vocab, ["Short.", long], max_len=64)
    assert pieces[0] == [vocab.cls, *ids("Short."), vocab.sep] and len(pieces) > 3
    assert all(len(p) <= 64 and p[0] == vocab.cls and p[-1] == vocab.sep for p in pieces)
    assert all(len(p) == 64 for p in pieces[1:-1])  # full, but for the last
    assert [t for p in pieces[1:] for t in p[1:-1]] == ids(long)


# ----------------------------------------------------------------------------------------------------
# Packing


def test_best_fit_packs_every_document_once_within_budget_tighter_than_in_order():
    """Every document exactly once, no batch over budget, each document in the open batch it fits best."""
    assert list(train.best_fit([5, 6, 2], budget=8)) == [[1, 2], [0]]  # 2 goes beside 6 (room 2); first fit: 5
    pieces = random_pieces(300, high=128)
    plan = train.epoch_plan(pieces, 512, seed=0, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(300))
    assert all(sum(len(pieces[i]) for i in b) <= 512 for b in plan)
    batches_in_order, room = 1, 512  # packing in order, a new batch whenever the next document does not fit
    for piece in pieces:
        batches_in_order, room = (
            (batches_in_order, room - len(piece)) if len(piece) <= room else (batches_in_order + 1, 512 - len(piece))
        )
    assert len(plan) < batches_in_order and sum(map(len, pieces)) / (512 * len(plan)) > 0.95
    assert train.epoch_plan(pieces, 512, 0, 1) != plan  # a new order each epoch
    with pytest.raises(ValueError, match="--batch-tokens 64 cannot hold one document of 100 tokens"):
        list(train.best_fit([10, 100], budget=64))


def test_a_packed_batch_keeps_documents_apart():
    """cu_seqlens cut the stream at the documents, the padding is sequences of its own no longer than max_len,
    and each document's logits in the packed batch are its logits alone: no attention across documents."""
    pieces = random_pieces(3, low=40, high=90)
    b = train.pack(pieces, budget=400, pad_id=VOCAB.pad, max_len=128)
    lengths = [len(p) for p in pieces]
    padding = 400 - sum(lengths)
    seqlens = b.cu_seqlens.diff().tolist()
    pads = seqlens[len(lengths) :]
    assert seqlens[: len(lengths)] == lengths and sum(pads) == padding and len(pads) == math.ceil(padding / 128)
    assert all(0 < n <= 128 for n in pads)
    assert b.real.sum() == sum(lengths) and (b.input_ids[~b.real] == VOCAB.pad).all()
    torch.manual_seed(0)
    config = mb.ModernBertConfig(**SMALL)
    model = mb.ModernBertForMaskedLM(config).eval()
    with torch.no_grad():
        packed = model(b.input_ids, cu_seqlens=b.cu_seqlens).logits[0]
        start = 0
        for piece in pieces:
            alone = model(torch.tensor([piece])).logits[0]
            torch.testing.assert_close(packed[start : start + len(piece)], alone, atol=1e-5, rtol=1e-5)
            start += len(piece)
        # the same stream without the document boundaries gives other logits: the check can fail
        joined = model(b.input_ids, cu_seqlens=torch.tensor([0, 400], dtype=torch.int32)).logits[0]
        assert (joined[: lengths[0]] - packed[: lengths[0]]).abs().max() > 1e-3


def test_without_packing_each_document_is_alone_in_a_padded_row_of_max_len():
    """--no-packing: batch_tokens // max_len documents a batch, in the epoch's order, each alone in its row of
    max_len tokens, the rest of the row padding (a sequence of its own, as the packed batch's leftover is); masks on
    the documents only; the stream starts anywhere as the packed one does. (Held-out batches stay best-fit packed:
    the run with every switch, below.)"""
    pieces = [*random_pieces(29, high=128), [VOCAB.cls, *range(5, 131), VOCAB.sep]]  # one that fills its row
    rows = 512 // 128
    plan = train.epoch_plan(pieces, 512, seed=0, epoch=0, rows=rows)
    assert [len(b) for b in plan] == [4] * 7 + [2] and sorted(i for b in plan for i in b) == list(range(30))
    assert len(plan) > len(train.epoch_plan(pieces, 512, seed=0, epoch=0))  # best fit needs fewer batches
    for n, indices in enumerate(plan):
        b = train.pack([pieces[i] for i in indices], 512, VOCAB.pad, 128, rows)
        lengths = [len(pieces[i]) for i in indices]
        seqlens = [k for length in lengths for k in (length, 128 - length) if k] + [128] * (4 - len(indices))
        assert b.cu_seqlens.diff().tolist() == seqlens and b.input_ids.shape == (1, 512)
        for r, i in enumerate(indices):
            row, real = b.input_ids[0, 128 * r : 128 * (r + 1)], b.real[0, 128 * r : 128 * (r + 1)]
            assert row[: len(pieces[i])].tolist() == pieces[i] and (row[len(pieces[i]) :] == VOCAB.pad).all()
            assert real.tolist() == [True] * len(pieces[i]) + [False] * (128 - len(pieces[i]))
        masked = train.batch(pieces, indices, settings(), VOCAB, 0.3, n, rows)
        assert torch.equal(masked.real, b.real) and not (masked.labels[~b.real] != train.IGNORE).any()
    stream = [b for _, _, b in itertools.islice(train.numbered_batches(pieces, 512, 0, 0, rows), 12)]
    assert (
        stream[:8] == plan
        and [b for _, _, b in itertools.islice(train.numbered_batches(pieces, 512, 0, 5, rows), 7)] == stream[5:]
    )


# ----------------------------------------------------------------------------------------------------
# Masking


def test_masking_picks_30_percent_of_real_tokens_80_10_10_and_never_padding():
    """30% of the real tokens are targets, never padding; of them 80% [MASK], 10% random, 10% unchanged."""
    g = torch.Generator().manual_seed(0)
    T, real_tokens = 200_000, 180_000
    ids = torch.randint(5, VOCAB.size, (1, T), generator=g)
    ids[0, real_tokens:] = VOCAB.pad
    batch = train.Batch(ids, torch.tensor([0, real_tokens, T], dtype=torch.int32), torch.arange(T)[None] < real_tokens)
    masked = train.mask_tokens(batch, 0.3, VOCAB, torch.Generator().manual_seed(1))
    chosen = masked.labels != train.IGNORE
    assert not chosen[~batch.real].any() and torch.equal(masked.input_ids[~batch.real], ids[~batch.real])
    assert torch.equal(masked.labels[chosen], ids[chosen])  # the target is the original token
    assert torch.equal(masked.input_ids[~chosen], ids[~chosen])  # nothing else changes
    assert abs(chosen.sum().item() / real_tokens - 0.3) < 0.005
    n = chosen.sum().item()
    as_mask = (masked.input_ids[chosen] == VOCAB.mask).sum().item() / n
    kept = (masked.input_ids[chosen] == ids[chosen]).sum().item() / n
    random = 1 - as_mask - kept
    assert abs(as_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(random - 0.1) < 0.01, (as_mask, kept)
    again = train.mask_tokens(batch, 0.3, VOCAB, torch.Generator().manual_seed(1))
    assert torch.equal(again.input_ids, masked.input_ids)  # a batch's own seed gives its masks back


# ----------------------------------------------------------------------------------------------------
# StableAdamW


def stableadamw_by_hand(p, grads, lrs, betas=(0.9, 0.98), eps=1e-6, wd=0.0):
    """The update rule as the official code (src/optimizer.py) and optimi write it, in float64."""
    p, m, v = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.double()
        b1, b2 = ((b**t - b) / (b**t - 1) for b in betas)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        rms = math.sqrt((g * g / v.clamp(min=eps**2)).mean().item())
        eta = lr / max(1.0, rms)
        p = p * (1 - eta / lrs[0] * wd) - eta * m / (v.sqrt() + eps)
    return p


def run_optimizer(optimizer_cls, p0, grads, lrs, **kw):
    p = torch.nn.Parameter(p0.clone())
    opt = optimizer_cls([p], lr=lrs[0], **kw)
    for g, lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        p.grad = g.clone()
        opt.step()
    return p.detach()


def test_stableadamw_is_adamw_without_clipping():
    """With shrinking gradients the update RMS stays <= 1: torch's AdamW, its weight decay = ours / peak lr."""
    g = torch.Generator().manual_seed(0)
    p0, direction = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    grads = [direction * 0.5**t for t in range(6)]
    lrs = [1e-2, 1e-2, 8e-3, 5e-3, 2e-3, 1e-3]  # a schedule: decay follows it, as AdamW's does
    ours = run_optimizer(train.StableAdamW, p0, grads, lrs, weight_decay=1e-3)
    adamw = run_optimizer(torch.optim.AdamW, p0, grads, lrs, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-3 / 1e-2)
    torch.testing.assert_close(ours, adamw, atol=1e-6, rtol=1e-5)


def test_stableadamw_clips_a_spike_and_decays_as_its_formula():
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(50, generator=g)
    grads = [torch.randn(50, generator=g) * s for s in (1, 1, 30, 1)]  # step 3: a spike, update RMS >> 1
    lrs = [1e-2, 1e-2, 1e-2, 5e-3]
    ours = run_optimizer(train.StableAdamW, p0, grads, lrs, weight_decay=0.1)
    torch.testing.assert_close(ours.double(), stableadamw_by_hand(p0, grads, lrs, wd=0.1), atol=1e-6, rtol=1e-6)
    adamw = run_optimizer(torch.optim.AdamW, p0, grads, lrs, betas=(0.9, 0.98), eps=1e-6, weight_decay=10.0)
    assert (ours - adamw).abs().max() > 1e-3  # the spike is where the two part


@needs_optimi
def test_stableadamw_matches_optimi():
    """optimi's StableAdamW with decouple_lr=True, the implementation the official code copies."""
    import optimi

    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(40, 30, generator=g)
    grads = [torch.randn(40, 30, generator=g) * s for s in (1, 2, 50, 1, 0.1, 5)]
    lrs = [3e-3, 3e-3, 3e-3, 2e-3, 1e-3, 1e-4]
    ours = run_optimizer(train.StableAdamW, p0, grads, lrs, weight_decay=3e-4)
    kw = dict(betas=(0.9, 0.98), eps=1e-6, weight_decay=3e-4, decouple_lr=True, foreach=False, triton=False)
    theirs = run_optimizer(optimi.StableAdamW, p0, grads, lrs, **kw)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_no_weight_decay_on_norms_and_biases():
    model = mb.ModernBertForMaskedLM(mb.ModernBertConfig(**SMALL))
    decay, no_decay = train.param_groups(model, 3e-4)
    assert decay["weight_decay"] == 3e-4 and no_decay["weight_decay"] == 0.0
    assert "model.embeddings.tok_embeddings.weight" in decay["names"]  # tied to the decoder: listed once
    assert "decoder.weight" not in decay["names"] + no_decay["names"]
    assert "decoder.bias" in no_decay["names"] and "model.final_norm.weight" in no_decay["names"]
    matrices = ("Wqkv.weight", "Wo.weight", "Wi.weight", "dense.weight", "tok_embeddings.weight")
    assert all(n.endswith(matrices) for n in decay["names"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def small_model():
    torch.manual_seed(0)
    return mb.ModernBertForMaskedLM(mb.ModernBertConfig(**SMALL))


def steps_of(optimizer, model, grads, lrs, clip=False):
    """The model's weights after one optimizer step per gradient (one tensor per parameter), by hand-set lr."""
    for step_grads, lr in zip(grads, lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.clone()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_adamw_is_torchs_adamw_after_clipping_and_decays_as_stableadamw_at_the_peak():
    """--optimizer adamw: each step is torch's AdamW after clip_grad_norm_(1.0), with the same betas, eps and groups
    and a weight decay of --weight-decay / --lr; with gradients small enough that neither clips, it is StableAdamW."""
    adamw, stable = ({"optimizer": o, "lr": 1e-2, "weight_decay": 1e-3} for o in ("adamw", "stableadamw"))
    g = torch.Generator().manual_seed(0)
    shapes = [p.shape for p in small_model().parameters()]
    grads = [[torch.randn(s, generator=g) * scale for s in shapes] for scale in (1e-3, 1.0, 30.0)]  # then clipped
    assert torch.cat([x.flatten() for x in grads[1]]).norm() > 10
    lrs = [1e-2, 1e-2, 5e-3]
    model = small_model()
    ours = steps_of(train.new_optimizer(model, adamw), model, grads, lrs)
    model = small_model()
    torchs = torch.optim.AdamW(train.param_groups(model, 1e-3 / 1e-2), lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    by_hand = steps_of(torchs, model, grads, lrs, clip=True)
    for name in ours:
        torch.testing.assert_close(ours[name], by_hand[name], atol=1e-7, rtol=1e-6, msg=name)
    model = small_model()
    unclipped = steps_of(torch.optim.AdamW(train.param_groups(model, 0.1), 1e-2, (0.9, 0.98), 1e-6), model, grads, lrs)
    assert max((unclipped[k] - ours[k]).abs().max().item() for k in ours) > 1e-3  # clipping shows
    shrinking = [[x * 1e-4 * 0.5**t for x in grads[1]] for t in range(4)]  # total norm < 1, update RMS <= 1
    lrs = [1e-2, 1e-2, 5e-3, 1e-3]
    model = small_model()
    ours = steps_of(train.new_optimizer(model, adamw), model, shrinking, lrs)
    model = small_model()
    theirs = steps_of(train.new_optimizer(model, stable), model, shrinking, lrs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-7, rtol=1e-5, msg=name)


@pytest.mark.parametrize("optimizer", ["stableadamw", "adamw"])
def test_the_optimizers_state_saved_and_loaded_steps_on_as_if_never_saved(optimizer, tmp_path):
    """save_optimizer_state then load_optimizer_state into a fresh optimizer (on the same weights): the next steps
    are those of the optimizer that was never saved, bit for bit (AdamW counts its steps in a tensor)."""
    g = torch.Generator().manual_seed(0)
    shapes = [p.shape for p in small_model().parameters()]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    lrs, options = [1e-2] * 4, {"optimizer": optimizer, "lr": 1e-2, "weight_decay": 1e-3}
    model = small_model()
    straight = train.new_optimizer(model, options)
    steps_of(straight, model, grads[:2], lrs)
    train.save_optimizer_state(straight, {"global_step": 2, "train_seconds": 1.5}, str(tmp_path))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected = steps_of(straight, model, grads[2:], lrs)
    model = small_model()
    model.load_state_dict(weights)
    loaded = train.new_optimizer(model, options)
    assert train.load_optimizer_state(loaded, str(tmp_path), step=2) == 1.5
    assert equal(steps_of(loaded, model, grads[2:], lrs), expected)


# ----------------------------------------------------------------------------------------------------
# The schedule


def test_schedule_warms_up_linearly_holds_then_cools_down_as_1_minus_sqrt():
    lr = [train.learning_rate(1.0, s, (s + 1) / 100, warmup_steps=10, cooldown=0.2) for s in range(100)]
    assert lr[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warmup
    assert lr[9:80] == [1.0] * 71  # stable
    for s in range(80, 100):  # 1 - sqrt cooldown over the last 20%, to 0.1% of the peak
        x = ((s + 1) / 100 - 0.8) / 0.2
        assert lr[s] == pytest.approx(0.001 + 0.999 * (1 - math.sqrt(x)))
    assert all(a >= b for a, b in zip(lr[80:], lr[81:])) and lr[-1] == pytest.approx(0.001)


def test_the_linear_schedule_warms_up_the_same_then_decays_straight_to_0():
    """--schedule linear: WSD's warmup, the peak at its end, then a straight line to 0 at the end of the run; by
    time (--minutes) too, where the warmup's share of the run is only known as it goes."""
    lr = [train.learning_rate(1.0, s, (s + 1) / 100, 10, cooldown=0.2, schedule="linear") for s in range(100)]
    wsd = [train.learning_rate(1.0, s, (s + 1) / 100, 10, cooldown=0.2) for s in range(100)]
    assert lr[:10] == wsd[:10] and lr[9] == 1.0  # the same warmup, to the peak
    assert lr[54] == pytest.approx(0.5) and lr[-1] == 0.0  # halfway from the warmup's end (step 9) to the end
    assert all(a - b == pytest.approx(1 / 90) for a, b in zip(lr[9:], lr[10:]))  # a straight line
    by_time = [
        train.learning_rate(1.0, s, p, 10, 0.2, schedule="linear") for s, p in [(9, 0.3), (20, 0.65), (30, 1.0)]
    ]
    assert by_time == [1.0, pytest.approx(0.35 / (1 - 10 * 0.65 / 21)), 0.0]


@needs_transformers
def test_the_linear_schedule_is_transformers_one_step_on():
    """Step s of ours is step s + 1 of transformers' get_linear_schedule_with_warmup, as the warmup already is
    (ours counts the step being taken: step 0 learns at peak / warmup, not at 0)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=100)
    theirs = [schedule.lr_lambdas[0](s + 1) for s in range(100)]
    ours = [train.learning_rate(1.0, s, (s + 1) / 100, 10, 0.2, schedule="linear") for s in range(100)]
    assert ours == pytest.approx(theirs, abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# Training: the step and the loop


class KeepGradients:
    """An optimizer that keeps the gradients it is given, so that two ways of computing them can be compared."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = {name: p.grad.clone() for name, p in self.model.named_parameters()}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def test_a_step_over_two_batches_minimises_the_mean_over_all_their_masked_tokens():
    """train_step weights each batch's loss by its share of the step's masked tokens: two batches in one step give
    the gradients of one batch that holds both (so --accum N and N processes learn as one big batch). The plain
    mean of the two batches' losses, which the check must tell apart, gives others."""
    pieces = motif_pieces(60)
    plan = train.epoch_plan(pieces, 512, seed=0, epoch=0)
    a, b = (train.batch(pieces, plan[n], settings(), VOCAB, 0.3, n) for n in (0, 1))
    both = train.Batch(
        torch.cat([a.input_ids, b.input_ids], 1),
        torch.cat([a.cu_seqlens, b.cu_seqlens[1:] + 512]),
        torch.cat([a.real, b.real], 1),
        torch.cat([a.labels, b.labels], 1),
    )

    def gradients(batches, counts):
        torch.manual_seed(0)
        model = mb.ModernBertForMaskedLM(mb.ModernBertConfig(**SMALL, sparse_prediction=True))
        optimizer = KeepGradients(model)
        loss = train.train_step(model, optimizer, batches, counts, contextlib.nullcontext)
        return float(loss), optimizer.grads

    n = [int((x.labels != train.IGNORE).sum()) for x in (a, b)]
    assert n[0] != n[1]  # else the plain mean would be the same
    loss, grads = gradients([a, b], (n, sum(n)))
    one_loss, one_grads = gradients([both], ([sum(n)], sum(n)))
    assert loss == pytest.approx(one_loss, rel=1e-6)
    for name, g in one_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-7, rtol=1e-4)
    _, plain = gradients([a, b], ([1, 1], 2))
    assert max((plain[k] - one_grads[k]).abs().max().item() for k in one_grads) > 1e-5


def test_dense_prediction_decodes_every_position_for_the_same_loss_and_accuracy(tmp_path, small_text_file):
    """--dense-prediction: build() gives a model that sends every position through the head and decoder (logits
    (1, T, vocab)), trained here for a few steps; its loss, over the masked tokens still, is the sparse one, and
    evaluate() finds the loss and accuracy of sparse prediction on the same weights."""
    out = str(tmp_path / "out")
    settings = train.settle(
        train.parse_args(["--data", small_text_file, "--out", out, *ONE_LAYER, "--dense-prediction"])
    )
    with tempfile.TemporaryDirectory() as tokenizer_folder:
        model, _, vocab, pieces, _ = train.build(settings, 0, tokenizer_folder, torch.device("cpu"))
    assert not model.config.sparse_prediction
    plan = train.epoch_plan(pieces, 256, seed=0, epoch=0)
    batches = [train.batch(pieces, b, settings, vocab, 0.3, n) for n, b in enumerate(plan[:4])]
    optimizer = train.new_optimizer(model, {**settings, "lr": 1e-2})
    for step in range(20):  # until it answers more than one token, so that a wrong choice of rows shows
        n = int((batches[step % 4].labels != train.IGNORE).sum())
        train.train_step(model, optimizer, [batches[step % 4]], ([n], n), contextlib.nullcontext)
    b, masked = batches[0], batches[0].labels != train.IGNORE
    with torch.no_grad():
        dense = model(b.input_ids, cu_seqlens=b.cu_seqlens, labels=b.labels)
        model.config.sparse_prediction = True
        sparse = model(b.input_ids, cu_seqlens=b.cu_seqlens, labels=b.labels)
    assert dense.logits.shape == (1, 256, model.config.vocab_size)
    assert sparse.logits.shape == (int(masked.sum()), model.config.vocab_size)
    torch.testing.assert_close(dense.loss, sparse.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dense.logits[masked], sparse.logits, atol=1e-5, rtol=1e-5)
    assert len(sparse.logits.argmax(-1).unique()) > 1
    sparse_eval = train.evaluate(model, batches, contextlib.nullcontext)
    model.config.sparse_prediction = False
    dense_eval = train.evaluate(model, batches, contextlib.nullcontext)
    assert dense_eval[1] == sparse_eval[1] > 0 and dense_eval[0] == pytest.approx(sparse_eval[0], rel=1e-6)


def as_padded_rows(input_ids, cu_seqlens, labels, pad_id):
    """A packed batch as run_mlm.py would feed it: one row per sequence, right-padded, with an attention mask."""
    lengths = cu_seqlens.diff().tolist()

    def rows(t, fill):
        return torch.nn.utils.rnn.pad_sequence(t[0].split(lengths), batch_first=True, padding_value=fill)

    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    return rows(input_ids, pad_id), mask.long(), rows(labels, train.IGNORE)


class RunMlmStyle(torch.nn.Module):
    """transformers' model in train.py's loop, each packed document a row of a padded batch."""

    def __init__(self, official):
        super().__init__()
        self.official = official

    def forward(self, input_ids, cu_seqlens, labels):
        ids, mask, labels = as_padded_rows(input_ids, cu_seqlens, labels, self.official.config.pad_token_id)
        return self.official(input_ids=ids, attention_mask=mask, labels=labels)


def losses_in_the_loop(model, batches, forward=None, steps=5, lr=3e-3, wd=3e-4):
    opt = train.StableAdamW(train.param_groups(model, wd), lr=lr)
    out = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = train.learning_rate(lr, step, (step + 1) / steps, warmup_steps=2, cooldown=0.4)
        batch = batches[step]
        n = int((batch.labels != train.IGNORE).sum())
        out.append(float(train.train_step(forward or model, opt, [batch], ([n], n), contextlib.nullcontext)))
    return out


@needs_transformers
@pytest.mark.parametrize("wrong", [None, "attention across documents", "untied decoder"])
def test_same_losses_as_transformers_in_this_loop(wrong):
    """From the same init, on the same packed and masked batches, with the same StableAdamW and schedule, ours and
    transformers' ModernBertForMaskedLM (fed as padded rows) give the same losses step after step. Each wrong
    variant must fail the same comparison: one breaks the forward, the other only the updates."""
    config = mb.ModernBertConfig(**SMALL, sparse_prediction=True)
    torch.manual_seed(0)
    ours = mb.ModernBertForMaskedLM(config)
    official = transformers.ModernBertForMaskedLM(
        transformers.ModernBertConfig(**config.to_dict(), attn_implementation="sdpa")
    )
    official.load_state_dict(ours.state_dict())
    pieces = motif_pieces(60)
    plan = train.epoch_plan(pieces, 512, seed=0, epoch=0)
    batches = [train.batch(pieces, b, settings(), VOCAB, 0.3, n) for n, b in enumerate(plan[:5])]
    mine = batches
    if wrong == "attention across documents":
        mine = [train.Batch(b.input_ids, torch.tensor([0, 512], dtype=torch.int32), b.real, b.labels) for b in batches]
    if wrong == "untied decoder":
        ours.decoder.weight = torch.nn.Parameter(ours.decoder.weight.detach().clone())
    theirs = losses_in_the_loop(official, batches, forward=RunMlmStyle(official))
    mine = losses_in_the_loop(ours, mine)
    worst = max(abs(a - b) for a, b in zip(mine, theirs))
    if wrong is None:
        assert worst < 2e-5, f"losses ours {mine} vs transformers {theirs}"  # measured: < 1e-6
    else:
        assert worst > 1e-3, f"{wrong}: the comparison did not notice ({worst:.2g}): ours {mine}, theirs {theirs}"


# ----------------------------------------------------------------------------------------------------
# The run's plan


def test_the_default_run_is_a_fixed_number_of_steps(tmp_path):
    """No flag: DEFAULTS' steps, warmup and cooldown start, whatever the clock says, so the same run on every machine.
    --minutes sizes a run by the clock instead."""
    settings = train.settle(train.parse_args(["--out", str(tmp_path / "out")]))
    steps = settings["steps"]
    assert steps == train.DEFAULTS["steps"] and isinstance(steps, int) and "minutes" not in settings
    state = train.new_state(settings, settings["batch_tokens"])
    clock = train.Clock(settings, state, world=1, device=torch.device("cpu"), seconds_left=0.0)
    assert clock.total_seconds is None and "train_seconds" not in settings
    warmup, cooldown_start = round(0.05 * steps), round(0.8 * steps)
    assert clock.warmup_steps == warmup
    assert clock.plan() == (
        f"{steps:,} steps of 1,024 tokens: lr 1.00e-03 after a {warmup}-step warmup, 1-sqrt cooldown from step "
        f"{cooldown_start:,} to {steps:,}."
    )
    progress = []
    for seconds in (0.1, 100.0, 1e-3, 5.0):  # however long each step takes
        progress.append(clock.progress_after_next_step())
        clock.step_done(seconds)
    assert progress == [k / steps for k in (1, 2, 3, 4)]
    lr = [train.learning_rate(1.0, s, (s + 1) / steps, warmup, 0.2) for s in range(steps)]
    assert lr[warmup - 1] == lr[cooldown_start - 1] == 1.0 > lr[cooldown_start]  # the turns the plan names
    timed = train.settle(train.parse_args(["--out", str(tmp_path / "out"), "--minutes", "5"]))
    assert timed["minutes"] == 5 and "steps" not in timed


CLASSIC = ["--no-packing", "--mask-rate", "0.15", "--dense-prediction", "--optimizer", "adamw", "--schedule", "linear"]


def test_the_plan_line_names_the_pieces_switched_to_the_classic(tmp_path):
    settings = train.settle(train.parse_args(["--out", str(tmp_path / "out"), *CLASSIC]))
    assert {k: settings[k] for k in (*train.SWITCHES, "mask_rate")} == dict(
        packing=False, sparse_prediction=False, optimizer="adamw", schedule="linear", mask_rate=0.15
    )
    clock = train.Clock(settings, train.new_state(settings, 1024), 1, torch.device("cpu"), seconds_left=0.0)
    assert clock.plan() == (
        "1,440 steps of 1,024 tokens: lr 1.00e-03 after a 72-step warmup, linear decay to 0 at step 1,440. Classic "
        "pieces: --no-packing --dense-prediction --mask-rate 0.15 --optimizer adamw --schedule linear."
    )


def test_evaluations_fall_once_per_tenth_and_a_resumed_run_does_not_catch_up():
    """--evals 10: one evaluation as the run passes each tenth; a run resumed at 55% evaluates once at 60%, not
    six times in a row; the end (progress 1) is the final evaluation's, outside the loop."""
    log = train.Log({"log_every": 10, "evals": 10, "out": "unused"}, {"global_step": 0}, show=False)
    due = [p for p in (0.05, 0.1, 0.15, 0.2, 0.35, 0.4) if log.eval_due(p)]
    assert due == [0.1, 0.2, 0.35, 0.4]
    resumed = train.Log({"log_every": 10, "evals": 10, "out": "unused"}, {"global_step": 0}, show=False)
    due = [p for p in (0.55, 0.56, 0.6, 0.65, 0.7, 1.0) if resumed.eval_due(p)]
    assert due == [0.55, 0.6, 0.7]


# ----------------------------------------------------------------------------------------------------
# The output folder (a real training run: slow)

MODEL_FILES = {"config.json", "model.safetensors", *load.TOKENIZER_FILES, "trainer_state.json"}  # at the top of --out


@pytest.mark.slow
def test_the_folder_holds_a_checkpoint_its_tokenizer_and_the_trainer_state(trained, capsys):
    """The model, its tokenizer and trainer_state.json at the top (what load.py and transformers read), and the same
    files, linked, with the optimizer's state and the settings in checkpoint-4, which --resume reads."""
    assert set(os.listdir(trained)) == {*MODEL_FILES, "checkpoint-4"}
    checkpoint = os.path.join(trained, "checkpoint-4")
    assert train.get_last_checkpoint(trained) == checkpoint
    assert set(os.listdir(checkpoint)) == {*MODEL_FILES, *train.RUN_FILES}
    for name in MODEL_FILES:
        assert os.path.samefile(os.path.join(trained, name), os.path.join(checkpoint, name))
    state = json.load(open(os.path.join(trained, "trainer_state.json")))
    assert state["global_step"] == 4 and state["max_steps"] == 4
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    assert (
        len(losses) == 4
        and all(math.isfinite(x) for x in losses)
        and {"learning_rate", "step"} <= set(state["log_history"][0])
    )
    assert len(evals) == 1 and 0 <= evals[0]["eval_accuracy"] <= 1
    assert load.main(["--model", trained, "--top-k", "2", "Return the [MASK] of the list."]) == 0
    printed = capsys.readouterr().out
    assert "Return the [MASK] of the list." in printed and "[MASK] 1 of 1:" in printed


@pytest.mark.slow
def test_score_runs_scores_each_run_on_the_same_masks_and_its_own_masks_as_the_run_did(trained, tmp_path, capsys):
    """tools/score_runs.py: with the run's own seed and batch tokens, the accuracy the run recorded at its end; with
    others, other masks; a folder train.py did not write is one line and exit status 2."""
    spec = importlib.util.spec_from_file_location("score_runs", os.path.join(HERE, "tools", "score_runs.py"))
    score_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score_runs)
    state = json.load(open(os.path.join(trained, "trainer_state.json")))
    recorded = [e["eval_accuracy"] for e in state["log_history"] if "eval_accuracy" in e][-1]
    assert score_runs.score(trained, [0], 512) == [pytest.approx(recorded, abs=5e-5)]  # TINY: seed 0, 512 tokens
    assert len(set(score_runs.score(trained, range(4), 2048))) > 1  # four draws, four sets of masks
    assert score_runs.main([trained, "--draws", "2", "--batch-tokens", "512"]) == 0
    mean = float(capsys.readouterr().out.splitlines()[-1].split("\t")[1])
    assert mean == pytest.approx(sum(score_runs.score(trained, [0, 1], 512)) / 2, abs=5e-5)
    with pytest.raises(SystemExit) as e:
        score_runs.main([str(tmp_path)])
    assert e.value.code == 2 and "holds no checkpoint-<step>/ folder" in capsys.readouterr().err


@pytest.mark.slow
@needs_transformers
def test_transformers_loads_the_folder_with_the_same_logits(trained):
    ours = load.load_model(trained)
    tokenizer = load.load_tokenizer(trained)
    texts = ["Return the [MASK] of the list.", "A longer text, with [MASK] words."]
    batch = load.tokenize(tokenizer, texts)
    official = transformers.AutoModelForMaskedLM.from_pretrained(trained, attn_implementation="sdpa").eval()
    theirs_tokenizer = transformers.AutoTokenizer.from_pretrained(trained)
    assert theirs_tokenizer(texts, padding=True)["input_ids"] == batch["input_ids"].tolist()
    with torch.no_grad():
        a, b = ours(**batch).logits, official(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=1e-4)
    state = transformers.TrainerState.load_from_json(os.path.join(trained, "trainer_state.json"))
    assert state.global_step == 4 and state.log_history[0]["loss"] > 0


@pytest.mark.slow
def test_a_kill_anywhere_in_a_save_leaves_the_last_whole_checkpoint(tmp_path, small_text_file):
    """A save of step 2 over the folder that holds step 1, killed (SIGKILL) just before each change it makes to the
    file system in turn: --resume then finds one whole checkpoint, step 1's or step 2's (weights, optimizer and
    step of one step), never a mix of the two and never none."""
    base = str(tmp_path / "base" / "out")
    settings = train.settle(train.parse_args(["--data", small_text_file, "--out", base, *ONE_LAYER]))
    tokenizer_folder = str(tmp_path / "tokenizer")
    os.makedirs(tokenizer_folder)
    model, _, vocab, pieces, _ = train.build(settings, 0, tokenizer_folder, torch.device("cpu"))
    optimizer = train.StableAdamW(train.param_groups(model, settings["weight_decay"]), lr=settings["lr"])
    state = train.new_state(settings, settings["batch_tokens"])
    plan, expected = train.epoch_plan(pieces, settings["batch_tokens"], seed=0, epoch=0), {}

    def step():
        b = train.batch(pieces, plan[state["global_step"]], settings, vocab, 0.3, state["global_step"])
        n = int((b.labels != train.IGNORE).sum())
        train.train_step(model, optimizer, [b], ([n], n), contextlib.nullcontext)
        state["global_step"] += 1
        expected[state["global_step"]] = ({k: v.clone() for k, v in model.state_dict().items()}, moments(optimizer))

    step()
    train.save_run(base, model, optimizer, state, settings, tokenizer_folder)
    step()
    for at in itertools.count():
        out = str(tmp_path / str(at) / "out")
        shutil.copytree(base, out)

        def save_step_2(out=out, at=at):
            kill_inside_saves(at)
            train.save_run(out, model, optimizer, state, settings, tokenizer_folder)
            return 0

        status = exit_status(fork(save_step_2))
        found, weights, found_moments = resumed(out)
        assert equal(weights, expected[found][0]) and equal(found_moments, expected[found][1]), (at, found)
        if status == 0:  # the save went through: no change left to kill it at
            assert found == 2
            break
        assert status == -signal.SIGKILL
    assert at > 10  # the save was killed at every one of its changes


@pytest.mark.slow
def test_twenty_kills_at_random_moments_lose_no_checkpoint_and_resume_to_the_same_weights(
    tmp_path, small_text_file, capsys
):
    """A run of 12 steps saved every 2, killed (SIGKILL) 20 times at random moments: half by the clock, anywhere in
    the run, half inside its saves, at a random change to the file system (the first before its first checkpoint
    is whole). After each kill the folder's last whole checkpoint is at least the last save that had ended (none
    lost), with the uninterrupted run's weights of that step exactly, or, before any save, --resume is refused in
    one line and a new run starts in the folder over what the kill left; every run resumed to its end has the
    uninterrupted run's final weights exactly."""
    args = ["--data", small_text_file, "--steps", "12", "--save-every", "2", *ONE_LAYER]
    saved, save_run = {}, train.save_run  # the uninterrupted run's weights at each save

    def save_and_keep(out, model, optimizer, state, *rest):
        save_run(out, model, optimizer, state, *rest)
        weights = model.state_dict()
        saved[state["global_step"]] = {k: v.clone() for k, v in weights.items() if k != "decoder.weight"}  # tied

    train.save_run = save_and_keep
    try:
        t0 = time.perf_counter()
        assert train.main([*args, "--out", str(tmp_path / "straight")]) == 0
        run_seconds = time.perf_counter() - t0
    finally:
        train.save_run = save_run
    final = mb.read_safetensors(str(tmp_path / "straight"))
    rng, kills, in_saves, refused, chains = random.Random(0), 0, 0, 0, 0
    out, log = str(tmp_path / "0" / "out"), str(tmp_path / "0" / "saved")
    while True:
        if train.get_last_checkpoint(out) is None and os.path.exists(out):  # killed before its first save
            assert train.main(["--out", out, "--resume"]) == 2
            assert "start the run without --resume" in one_line(capsys.readouterr().err)
            refused += 1
        in_save = kills < 20 and kills % 2 == 0
        at = 3 if kills == 0 else rng.randrange(40)  # drawn here (a forked run's draws do not come back); the first
        # kill lands in the first save, before its checkpoint is whole

        def attempt(out=out, log=log, in_save=in_save, at=at):
            save_run = train.save_run

            def save_and_log(out, model, optimizer, state, *rest):
                save_run(out, model, optimizer, state, *rest)
                with open(log, "a") as f:
                    f.write(f"{state['global_step']}\n")

            train.save_run = save_and_log
            if in_save:
                kill_inside_saves(at)
            resume = ["--resume"] if train.get_last_checkpoint(out) else []
            return train.main([*args, "--out", out, *resume])

        pid = fork(attempt)
        if kills < 20 and not in_save:
            time.sleep(rng.uniform(0, run_seconds))
            os.kill(pid, signal.SIGKILL)
        status = exit_status(pid)
        if status == 0:  # the run reached its end
            assert equal(mb.read_safetensors(out), final), f"chain {chains}: resumed to other weights"
            assert set(os.listdir(out)) == {*MODEL_FILES, "checkpoint-12"}  # what the kills left is gone
            if kills >= 20:
                break
            chains += 1
            out, log = str(tmp_path / str(chains) / "out"), str(tmp_path / str(chains) / "saved")
            continue
        assert status == -signal.SIGKILL, status
        kills, in_saves = kills + 1, in_saves + in_save
        last_saved = max(map(int, open(log).read().split()), default=0) if os.path.exists(log) else 0
        last = train.get_last_checkpoint(out)
        step = int(last.rsplit("-", 1)[1]) if last else 0
        assert step >= last_saved, f"kill {kills}: the checkpoint of step {last_saved} is lost"
        if last:
            assert equal(mb.read_safetensors(last), saved[step]), f"kill {kills}: step {step} is not the run's"
    assert kills == 20 and in_saves == 10 and refused >= 1


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_is_refused_and_a_killed_runs_lock_is_taken_over(
    tmp_path, small_text_file, capsys
):
    """While a run trains into --out, a second one into it (new or --resume) is refused at once, naming the process
    that holds it; once that run is killed, --resume takes its lock over, saying so, and goes on."""
    out = str(tmp_path / "out")
    args = ["--data", small_text_file, "--out", out, "--steps", "3", "--save-every", "1", *ONE_LAYER]
    ready, holding = os.pipe()

    def run_that_holds_the_folder():
        log_step = train.Log.step

        def step_then_hold(self, *a):
            log_step(self, *a)
            if self.state["global_step"] == 2:  # step 1 is saved
                os.write(holding, b"1")
                time.sleep(600)

        train.Log.step = step_then_hold
        return train.main(args)

    pid = fork(run_that_holds_the_folder)
    try:
        assert os.read(ready, 1) == b"1"
        for second in (args, ["--out", out, "--resume"]):
            assert train.main(second) == 2
            err = one_line(capsys.readouterr().err)
            assert f"in use by process {pid}" in err, err
    finally:
        os.kill(pid, signal.SIGKILL)
        assert exit_status(pid) == -signal.SIGKILL
    assert train.main(["--out", out, "--resume"]) == 0
    assert f"left by process {pid}" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "trainer_state.json")))["global_step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("where", ["in the loss", "in the weights"])
def test_a_loss_or_weights_not_finite_stop_the_run_and_keep_the_last_checkpoint(
    where, tmp_path, small_text_file, capsys, monkeypatch
):
    """A NaN weight before step 3's forward (its loss is NaN), or after step 3's update (its loss is finite, its
    weights are not): the run stops at step 3 in one line naming the step and the learning rate, exit status 2,
    and step 2's checkpoint stays, the folder's model with it."""
    out = str(tmp_path / "out")
    train_step, update = train.train_step, train.StableAdamW.step
    calls = itertools.count(1)

    def poison(params):
        with torch.no_grad():
            next(iter(params)).view(-1)[0] = math.nan

    if where == "in the loss":

        def train_step_poisoned(model, *args):
            if next(calls) == 3:
                poison(model.parameters())
            return train_step(model, *args)

        monkeypatch.setattr(train, "train_step", train_step_poisoned)
    else:

        def update_poisoned(self):
            update(self)
            if next(calls) == 3:
                poison(self.param_groups[0]["params"])

        monkeypatch.setattr(train.StableAdamW, "step", update_poisoned)
    args = ["--data", small_text_file, "--out", out, "--steps", "4", "--save-every", "1", *ONE_LAYER]
    assert train.main(args) == 2
    err = one_line(capsys.readouterr().err)
    assert "step 3" in err and "learning rate" in err, err
    step, weights, found_moments = resumed(out)
    assert step == 2 and all(t.isfinite().all() for t in weights.values())
    assert all(m.isfinite().all() and v.isfinite().all() for m, v in found_moments.values())
    assert all(t.isfinite().all() for t in mb.read_safetensors(out).values())


@pytest.mark.slow
def test_a_save_that_fails_is_one_line_and_keeps_the_last_checkpoint(tmp_path, small_text_file, capsys, monkeypatch):
    """The disk fills up in the middle of the save of step 2 (safetensors raises its own error): one line, exit
    status 2, and step 1's checkpoint whole."""
    from safetensors import SafetensorError
    from safetensors import torch as safetensors_torch

    out = str(tmp_path / "out")
    save_file, calls = safetensors_torch.save_file, itertools.count(1)

    def save_file_until_the_disk_is_full(*args, **kwargs):
        if next(calls) == 3:  # step 1: the model's file and the optimizer's
            raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors_torch, "save_file", save_file_until_the_disk_is_full)
    args = ["--data", small_text_file, "--out", out, "--steps", "3", "--save-every", "1", *ONE_LAYER]
    assert train.main(args) == 2
    err = one_line(capsys.readouterr().err)
    assert "No space left on device" in err and "step 2" in err, err
    assert resumed(out)[0] == 1


# ----------------------------------------------------------------------------------------------------
# Resuming, and many processes


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_ends_its_step_saves_it_and_resume_is_the_straight_run(sig, tmp_path, text_file, trained, capfd):
    """SIGINT (Ctrl-C) or SIGTERM (how a cluster preempts a job) in the middle of step 2, after its update, and again
    during the save: the run ends step 2, saves it (weights, optimizer, step and data position of step 2) and exits
    with 128 + the signal's number, saying so in one line; --resume then ends with the weights and losses of the
    run that went through, bit for bit."""
    out = str(tmp_path / "out")

    def interrupted_run():
        update, save_run, calls = train.StableAdamW.step, train.save_run, itertools.count(1)

        def update_then_signal(self):
            update(self)
            if next(calls) == 2:
                os.kill(os.getpid(), sig)

        def signal_then_save(*args):
            os.kill(os.getpid(), sig)
            return save_run(*args)

        train.StableAdamW.step, train.save_run = update_then_signal, signal_then_save
        return train.main(["--data", text_file, "--out", out, "--steps", "4", *TINY])

    capfd.readouterr()
    assert exit_status(fork(interrupted_run)) == 128 + sig
    err = capfd.readouterr().err.strip().splitlines()
    assert f"Interrupted by {sig.name} after step 2: saved in {out}; --resume continues it." in err, err
    assert resumed(out)[0] == 2
    assert train.main(["--out", out, "--resume"]) == 0
    resumed_run, straight = (json.load(open(os.path.join(f, "trainer_state.json"))) for f in (out, trained))
    assert resumed_run["global_step"] == 4

    def losses(state):
        return [e["loss"] for e in state["log_history"] if "loss" in e]

    assert losses(resumed_run) == losses(straight)
    a, b = (mb.read_safetensors(f) for f in (out, trained))
    assert equal(a, b), {k: (a[k] - b[k]).abs().max().item() for k in b}


@pytest.mark.slow
def test_a_run_with_every_piece_switched_resumes_to_the_straight_run_and_is_evaluated_as_the_default(
    tmp_path, small_text_file, monkeypatch
):
    """Every switch at once (--no-packing, --mask-rate 0.15, --dense-prediction, --optimizer adamw, --schedule
    linear): a run of 3 steps, and one stopped by SIGINT after step 2 then resumed, end with the same losses and
    weights bit for bit (AdamW's state saved and loaded); each training batch is rows of one document each; the model
    is saved dense; and every run is evaluated on the default run's held-out batches (best fit, masked at 15%)."""
    held_out, trained_on, evaluate, train_step = [], [], train.evaluate, train.train_step

    def recorded(model, batches, autocast):
        held_out.append([(b.input_ids, b.cu_seqlens, b.labels) for b in batches])
        return evaluate(model, batches, autocast)

    def recorded_step(model, optimizer, batches, *args):
        trained_on.extend(batches)
        return train_step(model, optimizer, batches, *args)

    monkeypatch.setattr(train, "evaluate", recorded)
    monkeypatch.setattr(train, "train_step", recorded_step)
    straight, out = str(tmp_path / "straight"), str(tmp_path / "out")
    args = ["--data", small_text_file, "--steps", "3", *ONE_LAYER, *CLASSIC]
    assert train.main([*args, "--out", straight]) == 0
    for b in trained_on:  # ONE_LAYER: 4 rows of 64 tokens, each a document then padding
        assert {0, 64, 128, 192, 256} <= set(b.cu_seqlens.tolist())
        assert all(row.tolist() == sorted(row.tolist(), reverse=True) and row[0] for row in b.real.view(4, 64))
    update, calls = train.ClippedAdamW.step, itertools.count(1)

    def update_then_signal(self):
        update(self)
        if next(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train.ClippedAdamW, "step", update_then_signal)
    assert train.main([*args, "--out", out]) == 128 + signal.SIGINT
    monkeypatch.setattr(train.ClippedAdamW, "step", update)
    assert resumed(out)[0] == 2 and len(held_out) == 1  # stopped: no evaluation
    assert train.main(["--out", out, "--resume"]) == 0
    logs = [json.load(open(os.path.join(f, "trainer_state.json")))["log_history"] for f in (straight, out)]
    assert [e.get("loss") for e in logs[0]] == [e.get("loss") for e in logs[1]]
    a, b = (mb.read_safetensors(f) for f in (straight, out))
    assert equal(a, b), {k: (a[k] - b[k]).abs().max().item() for k in b}
    assert json.load(open(os.path.join(out, "config.json")))["sparse_prediction"] is False
    assert train.main(["--data", small_text_file, "--steps", "1", *ONE_LAYER, "--out", str(tmp_path / "default")]) == 0
    assert len(held_out) == 3 and all(equal(dict(enumerate(h)), dict(enumerate(held_out[-1]))) for h in held_out)


@pytest.mark.slow
def test_resume_refuses_data_whose_content_changed(tmp_path, text_file, trained, capsys):
    """The run records a hash of its documents: the same path holding other text is refused in one line; the same
    text at another path goes on."""
    data, out = tmp_path / "docs.txt", str(tmp_path / "out")
    shutil.copyfile(text_file, data)
    shutil.copytree(trained, out)
    for path in files_named(out, "training_args.json"):
        json.dump({**json.load(open(path)), "data": [str(data)]}, open(path, "w"))
    text = data.read_text()
    data.write_text(text.replace("Return", "Give back", 1))  # one word of one document
    assert train.main(["--out", out, "--resume", "--steps", "5"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "content" in err and str(data) in err, err
    data.write_text(text)
    assert train.main(["--out", out, "--resume", "--steps", "5"]) == 0


def test_resume_keeps_the_pieces_a_run_started_with_and_an_older_run_the_papers(tmp_path):
    """--resume continues with the switches recorded in training_args.json, and refuses another one in one line, as
    it does any other setting; a run saved before the switches existed ran (and resumes with) the paper's pieces."""
    folder = tmp_path / "out" / "checkpoint-2"
    folder.mkdir(parents=True)
    for name in train.RUN_FILES:
        (folder / name).write_text("{}")
    older = {k: v for k, v in train.DEFAULTS.items() if k not in train.SWITCHES}
    (folder / "training_args.json").write_text(json.dumps(older))

    def resume(*flags):
        return train.settle(train.parse_args(["--out", str(tmp_path / "out"), "--resume", *flags]))

    assert {k: resume()[k] for k in train.SWITCHES} == {k: train.DEFAULTS[k] for k in train.SWITCHES}
    assert resume("--optimizer", "stableadamw", "--schedule", "wsd")["optimizer"] == "stableadamw"
    for flags, words in [
        (["--no-packing"], "as it was started, without --no-packing; --no-packing was given"),
        (["--dense-prediction"], "without --dense-prediction; --dense-prediction was given"),
        (["--optimizer", "adamw"], "with --optimizer stableadamw; --optimizer adamw was given"),
        (["--schedule", "linear"], "with --schedule wsd; --schedule linear was given"),
        (["--mask-rate", "0.15"], "with --mask-rate 0.3; --mask-rate 0.15 was given"),
    ]:
        with pytest.raises(ValueError, match=re.escape(words)):
            resume(*flags)
    classic = dict(packing=False, sparse_prediction=False, optimizer="adamw", schedule="linear", mask_rate=0.15)
    (folder / "training_args.json").write_text(json.dumps({**older, **classic}))
    assert {k: resume()[k] for k in classic} == classic == {k: resume(*CLASSIC)[k] for k in classic}
    with pytest.raises(ValueError, match="with --optimizer adamw; --optimizer stableadamw was given"):
        resume("--optimizer", "stableadamw")
    (folder / "training_args.json").write_text(json.dumps({**older, "optimizer": "sgd"}))
    with pytest.raises(ValueError, match="--optimizer must be stableadamw or adamw, got sgd"):
        resume()


def not_safetensors(path):
    open(path, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")


def without_metadata(path):
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), path)


def edit_json(path, edit):
    content = json.load(open(path))
    json.dump(edit(content), open(path, "w"))


DAMAGED = {  # case: (file, how it is damaged)
    "optimizer not safetensors": ("optimizer.safetensors", not_safetensors),
    "optimizer without its step": ("optimizer.safetensors", without_metadata),
    "trainer state a list": ("trainer_state.json", lambda p: edit_json(p, lambda c: [c])),
    "trainer state's step a string": (
        "trainer_state.json",
        lambda p: edit_json(p, lambda c: {**c, "global_step": "4"}),
    ),
    "trainer state's log not a list": (
        "trainer_state.json",
        lambda p: edit_json(p, lambda c: {**c, "log_history": 1}),
    ),
    "training args a list": ("training_args.json", lambda p: edit_json(p, lambda c: [c])),
    "training args' lr a string": ("training_args.json", lambda p: edit_json(p, lambda c: {**c, "lr": "1e-3"})),
    "training args without the batch": (
        "training_args.json",
        lambda p: edit_json(p, lambda c: c.pop("batch_tokens") and c),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_checkpoint_is_refused_in_one_line(case, tmp_path, trained, capsys):
    """--resume of a checkpoint whose files are damaged (not the format, or values of the wrong type): one line
    naming the file, exit status 2, never a traceback."""
    out = str(tmp_path / "out")
    shutil.copytree(trained, out)
    name, damage = DAMAGED[case]
    for path in files_named(out, name):
        damage(path)
    assert train.main(["--out", out, "--resume", "--steps", "5"]) == 2
    err = one_line(capsys.readouterr().err)
    assert name in err, err


@pytest.mark.slow
def test_continued_pretraining_starts_from_the_checkpoint(tmp_path, text_file, trained):
    """--init: the checkpoint's weights, size and tokenizer; then --resume of that run goes on past its end."""
    out = str(tmp_path / "out")
    args = ["--max-len", "128", "--batch-tokens", "512", "--log-every", "1", "--evals", "1", "--samples", "A [MASK]."]
    assert train.main(["--init", trained, "--data", text_file, "--out", out, "--steps", "2", *args]) == 0
    assert open(os.path.join(out, "tokenizer.json")).read() == open(os.path.join(trained, "tokenizer.json")).read()
    fresh, continued = (json.load(open(os.path.join(f, "trainer_state.json")))["log_history"] for f in (trained, out))
    assert continued[0]["loss"] < fresh[0]["loss"] - 0.05  # the same first batch, on trained weights
    assert train.main(["--out", out, "--resume", "--steps", "3"]) == 0
    assert json.load(open(os.path.join(out, "trainer_state.json")))["global_step"] == 3


@pytest.mark.slow
def test_two_processes_learn_as_one(tmp_path, text_file):
    """torchrun with 2 CPU processes (gloo), each taking its share of the packed batches, against one process that
    takes both shares itself (--accum 2): the same global batch, the same losses and weights."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["--data", text_file, "--steps", "3", *TINY]
    assert train.main([*args, "--accum", "2", "--out", one]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    res = subprocess.run([*run, "train.py", *args, "--out", two], cwd=HERE, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    logs = [json.load(open(os.path.join(f, "trainer_state.json")))["log_history"] for f in (one, two)]
    losses = [[e.get("loss", e.get("eval_loss")) for e in log] for log in logs]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    a, b = (mb.read_safetensors(f) for f in (one, two))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


INTERRUPT_PROCESS_1 = """import os, signal, sys
sys.path.insert(0, {here!r})
import train
update, calls = train.StableAdamW.step, []
def update_then_signal(self):
    update(self)
    calls.append(1)
    if len(calls) == {at} and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.{sig})
train.StableAdamW.step = update_then_signal
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_an_interrupt_or_a_kill_on_one_torchrun_process_ends_both_and_keeps_the_checkpoint(
    sig, tmp_path, small_text_file
):
    """torchrun, 2 processes; process 1 alone gets SIGINT in the middle of step 2, or is killed (SIGKILL) in the
    middle of step 3 after step 2 was saved: both processes end (no 30-minute wait for gloo's timeout), with a
    non-zero status, and --out holds step 2 whole. An interrupt is saved after its step, and process 0 says in one
    line where it came from."""
    out, script = str(tmp_path / "out"), tmp_path / "signal_process_1.py"
    script.write_text(INTERRUPT_PROCESS_1.format(here=HERE, at=2 if sig == "SIGINT" else 3, sig=sig))
    args = ["--data", small_text_file, "--out", out, "--steps", "4", "--save-every", "2", *ONE_LAYER]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    group = subprocess.Popen(  # a session of its own: on a hang, every process of it is killed
        [*run, str(script), *args],
        cwd=HERE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = group.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(group.pid, signal.SIGKILL)
        raise AssertionError(f"torchrun still runs after 240 s: {group.communicate()[1][-2000:]}") from None
    assert group.returncode != 0
    # step 2 saved (twice on an interrupt: --save-every, then the stop); a lock left only by a process killed
    assert set(os.listdir(out)) - {train.LOCK} == {*MODEL_FILES, "checkpoint-2"}
    if sig == "SIGINT":
        assert f"Interrupted by SIGINT on process 1 after step 2: saved in {out}; --resume continues it." in err, err
    assert resumed(out)[0] == 2


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written


def no_mask_checkpoint(folder, text_file):
    """A checkpoint whose tokenizer names no mask token."""
    torch.manual_seed(0)
    config = mb.ModernBertConfig(**{**SMALL, "vocab_size": 512, "num_hidden_layers": 1})
    mb.ModernBertForMaskedLM(config).save_pretrained(folder)
    train.save_tokenizer(train.train_tokenizer(train.read_documents([text_file]), 512), folder, 128)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        content = json.load(open(path))
        content.pop("mask_token")
        json.dump(content, open(path, "w"))


BAD_INPUT = {  # case: what the one line says
    "no text": "holds 0 document",
    "not text": "is not text",
    "data is a FIFO": "is a FIFO, not a regular file",
    "no mask token": "no mask token",
    "budget too small": "--batch-tokens 64 cannot hold one document",
    "out holds something else": "holds other files",
    "out is empty": "--out is empty",
    "out is under a file": "is a file, not a folder",
    "out cannot be written": "cannot be written",
    "a number out of range": "--evals must be positive, got 0",
    "a sample without a mask": "--samples: Text 1 has no [MASK]",
    "a sample longer than --max-len": "more than the model's 128 tokens",
    "a model too big for memory": "needs at least",
    "a batch too big for memory": "needs at least",
    "a vocabulary below the alphabet": "--vocab 5 is less than the 261",
    "a vocabulary too large": "--vocab 1000000000 is more than 1,000,000",
    "a mask rate that masks nothing": "--mask-rate 1e-09 masks",
    "a learning rate not finite": "--lr must be a finite number, got inf",
    "a weight decay of 1 or more": "--weight-decay must be at least 0 and less than 1",
    "a weight decay not finite": "--weight-decay must be a finite number, got nan",
    "no packing in a batch smaller than a row": "--no-packing puts each document in a row of --max-len 128 tokens",
    "resume with another size": "--resume continues the run",
    "out holds a run": "add --resume",
    "resume with a negative end": "--steps must be positive, got -1",
    "resume by another number of processes": "trained by 2 processes; continue it with 2, not 1",
}
FLAGS = {  # cases that are a flag more
    "a number out of range": ["--evals", "0"],
    "a sample without a mask": ["--samples", "A sample with nothing to fill."],
    "a sample longer than --max-len": ["--samples", "[MASK] " + "word " * 200],
    "a model too big for memory": ["--layers", "1e8"],  # 1e6 needs 560 GB: more than here, not than anywhere
    "a batch too big for memory": ["--batch-tokens", "1e9"],
    "a vocabulary below the alphabet": ["--vocab", "5"],
    "a vocabulary too large": ["--vocab", "1e9"],
    "a mask rate that masks nothing": ["--mask-rate", "1e-9"],
    "a learning rate not finite": ["--lr", "inf"],
    "a weight decay of 1 or more": ["--weight-decay", "1e9"],
    "a weight decay not finite": ["--weight-decay", "nan"],
    "no packing in a batch smaller than a row": ["--no-packing", "--batch-tokens", "100"],
}
NEEDS_A_RUN = ("resume with another size", "out holds a run", "resume with a negative end")
NEEDS_A_RUN += ("resume by another number of processes",)


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in NEEDS_A_RUN else c for c in BAD_INPUT]
)
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, text_file, request, capsys, monkeypatch):
    """Each mistake is one line and exit status 2, before training, with nothing written to --out, nor to a run
    it names, nor beside it (the cases that need a trained run are slow)."""
    out = str(tmp_path / "out")
    trained = request.getfixturevalue("trained") if case in NEEDS_A_RUN else None
    args = ["--data", text_file, "--out", out, "--steps", "1", *TINY, *FLAGS.get(case, [])]
    if case == "no text":
        (tmp_path / "empty.txt").write_text("\n\n  \n")
        args[1] = str(tmp_path / "empty.txt")
    elif case == "not text":
        (tmp_path / "data.bin").write_bytes(bytes(range(256)))
        args[1] = str(tmp_path / "data.bin")
    elif case == "data is a FIFO":
        os.mkfifo(tmp_path / "fifo.txt")
        args[1] = str(tmp_path / "fifo.txt")
    elif case == "no mask token":
        no_mask_checkpoint(str(tmp_path / "ckpt"), text_file)
        args = ["--init", str(tmp_path / "ckpt"), "--data", text_file, "--out", out, "--steps", "1", "--max-len", "64"]
    elif case == "budget too small":
        args += ["--batch-tokens", "64"]
    elif case == "resume with another size":
        args = ["--out", trained, "--resume", "--layers", "3"]
    elif case == "out holds something else":
        os.makedirs(out)
        open(os.path.join(out, "notes.txt"), "w").write("mine")
    elif case == "out is empty":  # an unset shell variable: nothing may land in the current folder
        monkeypatch.chdir(tmp_path)
        args[3] = ""
    elif case == "out is under a file":
        (tmp_path / "afile").write_text("mine")
        args[3] = str(tmp_path / "afile" / "sub")
    elif case == "out cannot be written":
        args[3] = "/proc/x"
    elif case == "out holds a run":
        args[3] = trained
    elif case == "resume with a negative end":
        args = ["--out", trained, "--resume", "--steps", "-1"]
    elif case == "resume by another number of processes":
        shutil.copytree(trained, out)
        path = os.path.join(train.get_last_checkpoint(out), "training_args.json")
        json.dump({**json.load(open(path)), "processes": 2}, open(path, "w"))
        trained, args = out, ["--out", out, "--resume", "--steps", "8"]

    def files(folder):
        return {f: os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder)} if folder else None

    before, around = files(trained), sorted(os.listdir(tmp_path))
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and BAD_INPUT[case] in err, err
    if case == "out holds something else":
        assert os.listdir(out) == ["notes.txt"]
    assert before == files(trained) and around == sorted(os.listdir(tmp_path))  # nor a probe, nor a .saving- folder


def test_a_count_flag_takes_1e3_and_refuses_what_is_not_a_whole_number(capsys):
    args = train.parse_args(["--steps", "1e3", "--batch-tokens", "4096"])
    assert (args.steps, args.batch_tokens) == (1000, 4096)
    with pytest.raises(SystemExit) as exit:
        train.parse_args(["--layers", "1.5"])
    assert exit.value.code == 2 and "argument --layers: 1.5 is not a whole number" in capsys.readouterr().err


def test_reading_data_skips_what_is_not_a_regular_file_one_line_a_kind(tmp_path, capsys):
    """A FIFO or a socket under a --data folder is skipped, saying so, instead of blocking in open()."""
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    os.mkfifo(tmp_path / "pipe.txt")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "socket.txt"))
    # were the FIFO opened, this unblocks it after a while, so that the test fails instead of hanging
    unblock = threading.Timer(10, lambda: os.close(os.open(tmp_path / "pipe.txt", os.O_WRONLY | os.O_NONBLOCK)))
    unblock.daemon = True
    unblock.start()
    try:
        documents = train.read_documents([str(tmp_path)])
    finally:
        unblock.cancel()
    assert documents == ["one", "two"]
    lines = capsys.readouterr().err.strip().split("\n")
    assert len(lines) == 2 and "skipped 1 FIFO" in lines[0] and "skipped 1 socket" in lines[1], lines
    assert all("not a regular file" in line for line in lines), lines


def test_the_tokenizer_trainer_sees_no_word_longer_than_its_limit():
    """Text without whitespace reaches the BPE trainer in pieces of at most LONGEST_WORD characters, all of it."""
    n = train.LONGEST_WORD
    doc = "short words " + "x" * (3 * n + 5) + " then " + "\t" * (n + 1) + "more"
    pieces = list(train.cut_long_words(["plain text", doc]))
    assert pieces[0] == "plain text" and "".join(pieces[1:]) == doc
    longest = max(len(w) for p in pieces for w in re.findall(r"\S+|\s+", p))
    assert longest == n, longest


@pytest.mark.slow
def test_a_megabyte_without_whitespace_trains_the_tokenizer():
    """1 MB of letters with no space between them: BPE rescans a word at every merge that touches it, so one
    5-MB word kept the trainer busy for hours (one of 1 MB, for minutes); cut into LONGEST_WORD pieces,
    it is as any 1 MB of text."""
    letters = re.sub(r"[^A-Za-z]", "", "".join(itertools.islice(train.stdlib_docstrings(), 3000)))
    doc = (letters * (1_000_000 // len(letters) + 1))[:1_000_000]
    tokenizer = train.train_tokenizer([doc, "a second document"], 4096)
    assert tokenizer.get_vocab_size() == 4096
    assert max(len(t) for t in tokenizer.get_vocab()) <= train.LONGEST_WORD


@pytest.mark.slow
def test_a_vocabulary_larger_than_the_data_gives_resumes_with_the_same_command(tmp_path, text_file, capsys):
    """--vocab is what was asked, recorded as asked: the data may give fewer tokens, and the same command with
    --resume continues the run instead of refusing it for another --vocab."""
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(itertools.islice(train.stdlib_docstrings(), 20)))
    args = ["--data", str(small), "--out", str(tmp_path / "out"), *TINY, "--vocab", "5000"]
    assert train.main([*args, "--steps", "1"]) == 0
    first = capsys.readouterr().out
    assert train.main([*args, "--steps", "2", "--resume"]) == 0, capsys.readouterr().err
    assert load.load_tokenizer(str(tmp_path / "out")).get_vocab_size() < 5000
    assert "(the data gave no more of the --vocab 5,000 asked)" in first and "on cpu, fp32" in first, first


@pytest.mark.parametrize("shape", [dict(layers=4, hidden=256, intermediate=384, vocab=8192), TINY_SHAPE])
def test_the_memory_estimate_counts_the_models_parameters(shape):
    """The estimate's parameters are the model's (within 1%: it leaves out the norms), and a batch adds to it."""
    config = train.new_config({**shape, "heads": 2, "max_len": 128}, train.Vocab(shape["vocab"], 4, 3, 1, 2))
    real = mb.ModernBertForMaskedLM(config).num_parameters()
    needed, params = train.memory_needed(shape, batch_tokens=2048, accum=1, mask_rate=0.3, bf16=False)
    assert abs(params - real) / real < 0.01, (params, real)
    assert 16 * params < needed < train.memory_needed(shape, 4096, 1, 0.3, False)[0]
