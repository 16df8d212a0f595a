"""Throughput and memory of modernbert.py against Hugging Face transformers' ModernBERT.

Both models get the same random ModernBERT-base weights (transformers' defaults, copied into ours),
run in the same process on the same right-padded batches, interleaved (every dtype asked for in the same
rounds), best of --repeats. Prints markdown tables for README.md. --device auto (the default) runs on CUDA
where there is a GPU, else on CPU with a note on stderr; --device cuda without a GPU is an error. What a
device does not run (workload f on a CPU, the other device's flags) is named in a note on stderr, never
dropped without a word.

On CPU: batches of B = --batch (16) sequences (c: B/2 of 512; d: one of 8192), workloads a-e (f is
GPU-sized: asked for, it is skipped), fp32 and bf16, ours vs theirs (transformers, sdpa), eager (--compile-cpu adds the
compiled variants below). Peak memory comes from fresh child processes (this file re-run with --child).

On CUDA: the paper's batch sizes, from B = --gpu-batch (512): (a) 512 sequences, lengths ~ N(256, 64)
in [32, 512]; (c) 256 x 512; (d) 8 x 8192 (B/64); (f) 32 (B/16) sequences, lengths ~ N(4096, 1024) in
[32, 8192]; workloads a,c,d,f in bf16 by default (b and e stay available). Four variants each: ours
(eager, our default kernel choice: flash where a kernel is found), ours_compiled (a copy with the same
weights, ModernBertForMaskedLM.compile()), theirs (sdpa, eager) and theirs_compiled (torch.compile of
its encoder, default options); --no-compile leaves out the compiled two. Compiling happens in the untimed
warm-up round; that first call's seconds are reported. Peak GPU memory is measured in this process around
one extra forward of each variant after timing. A variant that runs out of GPU memory is reported as OOM
and a failing theirs_compiled as failed; the run goes on.

--time-limit SECONDS (like Ctrl-C or `kill`) stops early and prints the rows finished so far; any other
error prints them too, before its traceback and exit status 1.

    python bench.py                                  # everything, on the GPU if there is one
    python bench.py --workloads a,c --dtypes fp32 --repeats 1 --no-memory   # a quick look
    python bench.py --device cpu --time-limit 3600   # the CPU tables on a GPU machine, at most an hour
    python bench.py --embeddings --device cpu        # sentence embeddings: load_embedder vs SentenceTransformer
    python bench.py --colbert --device cpu           # ColBERT documents: load_colbert vs PyLate (in PyLate's venv)
    python bench.py --train --device cpu             # a training step: train.py's against transformers' (run_mlm)
    python bench.py --build                          # seconds to build ModernBERT-base for masked LM from a config
    python bench.py --long-context                   # the 32K config: one 32,768-token forward's memory and time
    python bench.py --device cpu --busy-core ...     # any of the above with one core held by a busy loop
"""

import argparse
import contextlib
import copy
import functools
import gc
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback

import torch
import transformers

import modernbert as mb

MASK_ID = 50284  # [MASK] in the ModernBERT tokenizer
DTYPES = {name: mb.DTYPES[name] for name in ("fp32", "bf16")}  # the dtypes the tables time
WORKLOADS = {  # name: (description, lengths(B, generator)); B is --batch on CPU, --gpu-batch on CUDA
    "a": (
        "variable short: len ~ N(256, 64) in [32, 512], B seqs",
        lambda b, g: (torch.randn(b, generator=g) * 64 + 256).round().clamp(32, 512),
    ),
    "b": ("uniform: len ~ U[32, 512], B seqs", lambda b, g: torch.randint(32, 513, (b,), generator=g).float()),
    "c": ("fixed 512, B/2 seqs", lambda b, g: torch.full((max(1, b // 2),), 512.0)),
    "d": ("one 8192-token sequence", lambda b, g: torch.full((max(1, b // 64),), 8192.0)),
    "e": (
        "fill-mask, lengths as (a), 3 masks per seq",
        lambda b, g: (torch.randn(b, generator=g) * 64 + 256).round().clamp(32, 512),
    ),
    "f": (
        "GPU variable long: len ~ N(4096, 1024) in [32, 8192], B/16 seqs",
        lambda b, g: (torch.randn(max(1, b // 16), generator=g) * 1024 + 4096).round().clamp(32, 8192),
    ),
}
CUDA_DESCRIPTIONS = {"d": "fixed 8192, B/64 seqs"}  # on CPU, B = 16 gives one sequence, as the CPU tables say
MAY_FAIL = {"theirs_compiled"}  # any error in these is reported as "failed" (OOM anywhere is reported as "OOM")


class TimeLimit(KeyboardInterrupt):
    """--time-limit has passed: stops the run the way Ctrl-C does, so the finished rows are printed."""


def check_deadline(deadline):
    """Raises TimeLimit once time.perf_counter() is past the deadline (None: no limit)."""
    if deadline is not None and time.perf_counter() > deadline:
        raise TimeLimit


def make_batch(workload, batch, device):
    """Seeded right-padded (input_ids, attention_mask); fill-mask puts 3 [MASK]s in each sequence."""
    g = torch.Generator().manual_seed(1234)
    lengths = WORKLOADS[workload][1](batch, g).long()
    S = int(lengths.max())
    ids = torch.randint(100, 50000, (len(lengths), S), generator=g)
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
    if workload == "e":
        for row, n in enumerate(lengths.tolist()):
            ids[row, 1 + torch.randperm(n - 1, generator=g)[:3]] = MASK_ID
    ids = ids.masked_fill(mask == 0, mb.ModernBertConfig.pad_token_id)
    return ids.to(device), mask.to(device)


def describe(workload, device_type):
    """The workload's description in the tables (d names its count of sequences differently on CUDA)."""
    return CUDA_DESCRIPTIONS.get(workload, WORKLOADS[workload][0]) if device_type == "cuda" else WORKLOADS[workload][0]


def build_models(which, dtype, device, ours_impl, compiled=False):
    """Random ModernBERT-base MLM models, each built with its own library's init (seed 0): theirs (sdpa) and/or
    ours, with theirs' weights copied in when both are built. With compiled, also ours_compiled (a copy of ours,
    .compile()d: each encoder layer, dynamic shapes) and theirs_compiled (torch.compile of theirs' encoder, default
    options; it shares theirs' weights). torch.compile is lazy: the first call of each compiles."""
    torch.manual_seed(0)
    models = {}
    if which in ("both", "theirs"):
        models["theirs"] = transformers.ModernBertForMaskedLM._from_config(
            transformers.ModernBertConfig(), attn_implementation="sdpa"
        )
    if which in ("both", "ours"):
        models["ours"] = mb.ModernBertForMaskedLM(mb.ModernBertConfig(attn_implementation=ours_impl))
        if "theirs" in models:
            models["ours"].load_state_dict(models["theirs"].state_dict(), strict=True)
    models = {k: m.to(device=device, dtype=dtype).eval() for k, m in models.items()}
    if compiled and "ours" in models:
        models["ours_compiled"] = copy.deepcopy(models["ours"]).compile()
    if compiled and "theirs" in models:
        models["theirs_compiled"] = torch.compile(models["theirs"].model)
    return models


def forward_fns(models, workload, ids, mask):
    """name -> zero-argument forward returning what is compared, for each variant in `models`: hidden
    states of real tokens (a-d, f) or the vocabulary logits at the [MASK] positions (e). In e ours
    decodes the masked rows only; theirs computes all logits and then takes the masks, as the fill-mask
    pipeline does, and ours_full does the same with ours."""
    real = mask.bool()

    def ours_fn(ours):
        def ours_sparse():
            """encode, then head + decoder on the masked rows only."""
            hidden, packing, _ = ours.model.encode(ids, mask)
            rows = mb.unpad(ids, packing.indices) == MASK_ID
            return ours.decoder(ours.head(hidden[rows]))

        return ours_sparse if workload == "e" else lambda: ours.model(ids, mask).last_hidden_state[real]

    def theirs_fn(encoder, mlm):
        """encoder: mlm.model, or its compiled wrapper; in e, mlm's head and decoder run on all its output
        (what mlm's own forward does)."""
        if workload != "e":
            return lambda: encoder(input_ids=ids, attention_mask=mask).last_hidden_state[real]
        return lambda: mlm.decoder(mlm.head(encoder(input_ids=ids, attention_mask=mask).last_hidden_state))[
            ids == MASK_ID
        ]

    fns = {name: ours_fn(models[name]) for name in ("ours", "ours_compiled") if name in models}
    if "theirs" in models:
        fns["theirs"] = theirs_fn(models["theirs"].model, models["theirs"])
    if "theirs_compiled" in models:
        fns["theirs_compiled"] = theirs_fn(models["theirs_compiled"], models["theirs"])
    if workload == "e" and "ours" in models:
        fns["ours_full"] = lambda: models["ours"](ids, mask).logits[ids == MASK_ID]
    return fns


def sync(device):
    """Wait for queued GPU work, so wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory(device):
    """Drops what a failed call left behind, so the next variant starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(name, fn, device):
    """(fn's result, None), or (None, "OOM") when it runs out of GPU memory, or (None, "failed") when a
    variant in MAY_FAIL raises anything; the error's first line goes to stderr. Other errors propagate."""
    try:
        out = fn()
        sync(device)
        return out, None
    except torch.cuda.OutOfMemoryError as e:
        status, message = "OOM", str(e)
    except Exception as e:
        if name.split()[-1] not in MAY_FAIL:  # the name after its dtype
            raise
        status, message = "failed", f"{type(e).__name__}: {e}"
    print(f"    {name} {status}: {message.strip().splitlines()[0][:300] if message.strip() else ''}", file=sys.stderr)
    free_memory(device)  # after the except blocks: the traceback's frames, and their tensors, are gone
    return None, status


def time_interleaved(fns, repeats, device, warmup, deadline=None, inference=True):
    """Best seconds per fn over `repeats` rounds (order alternating each round), each fn's first output,
    and each fn's first-call seconds (compiling included). With warmup (on CUDA, and wherever something
    is compiled) an untimed round comes first; on CPU otherwise round 0 is timed too (first-call overhead
    is milliseconds against forwards of seconds). A fn that fails (see guarded) gets "OOM" or "failed"
    in place of its seconds and is not called again. Raises TimeLimit before any call past the deadline.
    inference=False (--train) keeps autograd on."""
    best, first, first_secs = {k: float("inf") for k in fns}, {}, {}
    names = list(fns)
    with torch.inference_mode(inference):
        for r in range(-1 if warmup else 0, repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                if isinstance(best[name], str):
                    continue
                check_deadline(deadline)
                sync(device)
                t = time.perf_counter()
                out, failure = guarded(name, fns[name], device)
                secs = time.perf_counter() - t
                if failure:
                    best[name] = failure
                    first_secs.setdefault(name, failure)
                    continue
                if r >= 0:
                    best[name] = min(best[name], secs)
                first.setdefault(name, out)
                compiling = " (first call: compiles)" if name not in first_secs and name.endswith("_compiled") else ""
                first_secs.setdefault(name, secs)
                print(f"    {name:15s} round {r}: {secs:7.2f}s{compiling}", file=sys.stderr)
    return best, first, first_secs


def model_flops(lengths, n_decoded, cfg=mb.ModernBertConfig()):
    """Useful matmul FLOPs of one forward over the real tokens only (a multiply-add is 2 FLOPs):
    per token and layer, the linear layers cost 2 * (Wqkv 3h^2 + Wo h^2 + Wi 2ih + Wo_mlp ih);
    attention costs 4 * h * keys (Q K^T and P V, 2 * h * keys each), where keys is the sequence
    length on global layers and only the keys inside the window |i - j| <= 64 on local layers;
    the MLM head costs 2 * (h^2 + h * vocab) per decoded (masked) token. Lookups, norms, softmax,
    RoPE and padding are not counted, so both models are credited with the same work."""
    h, i, w = cfg.hidden_size, cfg.intermediate_size, cfg.local_attention // 2
    n_global = sum(cfg.is_global(k) for k in range(cfg.num_hidden_layers))
    n_local = cfg.num_hidden_layers - n_global
    tokens, flops = 0, 0
    for L in lengths:
        pos = torch.arange(L)
        local_keys = int(((pos + w).clamp(max=L - 1) - (pos - w).clamp(min=0) + 1).sum())
        tokens += L
        flops += 4 * h * (n_global * L * L + n_local * local_keys)
    flops += tokens * cfg.num_hidden_layers * 2 * (3 * h * h + h * h + 2 * i * h + i * h)
    return flops + n_decoded * 2 * (h * h + h * cfg.vocab_size)


def matmul_ceiling(dtype, device, repeats=10):
    """Best FLOP/s of a square torch.matmul (2048 on CPU, 8192 on GPU), laid out as nn.Linear does
    (x @ W.T; on AVX2 CPUs a plain bf16 x @ W takes a ~30x slower path)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        torch.matmul(a, b.T)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def proc_status_kb(field):
    """A field of /proc/self/status (VmRSS, VmHWM) in kB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss():
    """VmHWM (the peak RSS) := the current RSS, so that what came before does not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cuda_peak_mb(fn):
    """CUDA memory one call of fn allocates at its peak above what was allocated before it, in MB."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def child_peak_mb(args):
    """Child mode: one forward of one model; its peak memory above the loaded weights and inputs, in MB.
    A compiled variant is called once first, so compiling is not counted."""
    device, name = torch.device(args.device), args.child
    which, compiled = name.removesuffix("_compiled").removesuffix("_full"), name.endswith("_compiled")
    models = build_models(which, DTYPES[args.dtypes], device, args.ours_impl, compiled)
    ids, mask = make_batch(args.workloads, args.batch, device)
    fn = forward_fns(models, args.workloads, ids, mask)[name]
    if compiled:
        with torch.inference_mode():
            fn()
    gc.collect()
    if device.type == "cuda":
        return cuda_peak_mb(fn)
    base = proc_status_kb("VmRSS")
    reset_peak_rss()  # model construction peaks do not count
    with torch.inference_mode():
        fn()
    return (proc_status_kb("VmHWM") - base) / 1024


def peak_mb(name, workload, dtype, device, batch, ours_impl):
    """Runs this file as a child for one (model, workload) and returns its peak MB, or None on failure.
    glibc's mmap threshold is pinned so freed tensors go back to the OS and RSS follows live memory."""
    cmd = [sys.executable, __file__, "--child", name, "--workloads", workload, "--dtypes", dtype]
    cmd += ["--device", device.type, "--batch", str(batch), "--ours-impl", ours_impl]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        print(f"    memory child {name} failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]


def measure_memory(fns, failures, w, dname, device, batch, impl):
    """name -> peak MB of one forward above the loaded weights and inputs. On CUDA in this process (an
    extra untimed forward of each variant: OOM and failures are caught, see guarded); on CPU in fresh
    child processes. A variant that failed while timed keeps its failure and is not run again."""
    mem = {}
    for name, fn in fns.items():
        if name in failures:
            mem[name] = failures[name]
        elif device.type == "cuda":
            peak, failure = guarded(name, lambda fn=fn: cuda_peak_mb(fn), device)
            mem[name] = failure or peak
            print(f"    {name:15s} peak MB: {fmt(mem[name], ',.0f')}", file=sys.stderr)
        else:
            mem[name] = peak_mb(name, w, dname, device, batch, impl)
    return mem


def machine_line():
    """CPU/GPU model, core count and library versions, for the table's heading."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    cores = f"{os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"
    return f"{cpu}, {cores}{gpu}; torch {torch.__version__}, transformers {transformers.__version__}"


def note(message):
    """What the run leaves out or decides by itself, said on stderr (the tables go to stdout)."""
    print(f"note: {message}", file=sys.stderr)


def pick_device(name):
    """--device: modernbert.pick_device's, on the two devices the tables cover: auto is the GPU where there is one,
    else the CPU (saying so); cuda without a GPU is an error."""
    try:
        device = mb.pick_device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: {e}") from None
    if device.type not in ("cuda", "cpu"):  # another accelerator (MPS, ...): the tables are the CPU's
        device = torch.device("cpu")
    if name == "auto" and device.type == "cpu":
        note("torch sees no CUDA GPU here, so this is the CPU benchmark (--device cuda requires the GPU)")
    return device


OTHER_DEVICE_FLAGS = {  # the flags for one device (set when not None), as the other one sees them
    "cpu": {"gpu_batch": "--gpu-batch", "compile": "--compile/--no-compile"},
    "cuda": {"batch": "--batch", "compile_cpu": "--compile-cpu"},
}


def apply_device_defaults(args, device):
    """The defaults that depend on the device: workloads, dtypes, the batch size B, compiling. Unknown names
    are errors; what this device does not run (f on a CPU, the other device's flags) is said, not dropped."""
    cuda = device.type == "cuda"
    if args.train:  # a training step costs about three forwards: fewer workloads and smaller batches by default
        args.workloads = args.workloads or ("a,c,f" if cuda else "a,c")
        args.dtypes = args.dtypes or ("bf16" if cuda else "fp32")
        args.batch = args.batch or (None if cuda else 8)
        args.gpu_batch = args.gpu_batch or (64 if cuda else None)
    args.workloads = args.workloads or ("a,c,d,f" if cuda else "a,b,c,d,e")
    args.dtypes = args.dtypes or ("bf16" if cuda else "fp32,bf16")
    for flag, names, known in (("--workloads", args.workloads, WORKLOADS), ("--dtypes", args.dtypes, DTYPES)):
        if unknown := [n for n in names.split(",") if n not in known]:
            raise ValueError(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from {','.join(known)}")
    if not cuda and "f" in args.workloads.split(","):
        note("workload f (GPU variable long: 32 sequences of ~4096 tokens) runs on CUDA only: skipped on cpu")
        args.workloads = ",".join(w for w in args.workloads.split(",") if w != "f")
        if not args.workloads:
            raise ValueError("--workloads f runs on CUDA only: nothing left to run on cpu")
    for dest, flag in OTHER_DEVICE_FLAGS[device.type].items():
        if getattr(args, dest) is not None:
            note(f"{flag} applies to the other device: ignored on {device.type}")
    args.batch_size = (args.gpu_batch or 512) if cuda else (args.batch or 16)
    args.compiled = (args.compile is not False) if cuda else bool(args.compile_cpu)


def parse_args(argv=None):
    """The flags, with the device and its defaults settled; a flag that cannot be honoured is an error
    (exit status 2, as argparse's own), and what this device leaves out is a note on stderr."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto (default): cuda where torch sees a GPU, else cpu, with a note on stderr; cuda without a GPU "
        "is an error",
    )
    p.add_argument(
        "--workloads",
        help="comma-separated subset of a,b,c,d,e,f; default a,b,c,d,e on CPU, a,c,d,f on CUDA "
        "(f runs on CUDA only: asked for on CPU, it is skipped with a note)",
    )
    p.add_argument("--dtypes", help="comma-separated subset of fp32,bf16; default fp32,bf16 on CPU, bf16 on CUDA")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per workload; the best counts (default 3)")
    p.add_argument(
        "--batch",
        type=int,
        help="CPU: sequences per batch B (default 16) for a, b, e (c uses B/2, d B/64 but at least one)",
    )
    p.add_argument(
        "--gpu-batch",
        type=int,
        help="CUDA: B (default 512, the paper's): B sequences for a, b, e; B/2 for c, B/64 for d, B/16 for f",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="CUDA: also time ours_compiled and theirs_compiled (default on)",
    )
    p.add_argument(
        "--compile-cpu", action="store_true", default=None, help="CPU: time the compiled variants too (off by default)"
    )
    p.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="start no new workload or variant after this many seconds; print the finished rows",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument(
        "--embeddings",
        action="store_true",
        help="instead of the models: sentence embeddings, embed.load_embedder's encode against sentence-transformers' "
        "SentenceTransformer.encode on a random ettin-encoder-32m-sized model (--texts, --repeats, --device)",
    )
    p.add_argument(
        "--train",
        action="store_true",
        help="instead of the models: one full training step of ModernBERT-base's masked LM, ours (train.py: packed, "
        "sparse prediction, StableAdamW) against transformers' padded (run_mlm.py) and padding-free "
        "(DataCollatorWithFlattening) batches; default B = 8 on CPU (fp32, workloads a,c), 64 on CUDA (bf16, a,c,f)",
    )
    p.add_argument(
        "--colbert",
        action="store_true",
        help="instead of the models: ColBERT documents, embed.load_colbert's encode against PyLate's ColBERT.encode "
        "on a random ettin-encoder-32m-sized model (--texts, --repeats, --device); needs PyLate's environment",
    )
    p.add_argument(
        "--texts", type=int, help="--embeddings, --colbert: texts in the corpus (default 256; --colbert: 2000)"
    )
    p.add_argument(
        "--kernels",
        action="store_true",
        help="instead of the models: the attention kernels' time per layer, global and local, at each workload's "
        "shape (--workloads, --repeats, the device's batch sizes)",
    )
    p.add_argument(
        "--build",
        action="store_true",
        help="instead of the forwards: seconds to build ModernBERT-base for masked LM from a config, ours vs theirs",
    )
    p.add_argument(
        "--busy-core", action="store_true", help="hold one core with a busy loop while timing (a shared machine)"
    )
    p.add_argument(
        "--long-context",
        action="store_true",
        help="instead of the forwards: the 32K config (YaRN on global layers), one sequence per length "
        "(--context-lengths), peak memory and seconds of one forward on the CPU (--dtypes, default fp32)",
    )
    p.add_argument(
        "--ablations",
        action="store_true",
        help="instead of the models: train.py's default run and each of its pieces switched off (one flag each), "
        "and transformers' run_mlm.py way, for --steps steps, once per seed; held-out masked accuracy, tokens, s/step",
    )
    p.add_argument("--steps", type=int, default=240, help="--ablations: optimizer steps of each run (default 240)")
    p.add_argument(
        "--run-mlm-steps",
        type=int,
        help="--ablations: the run_mlm way's steps (default: --steps); for equal minutes, the steps it makes in the "
        "time the recipe's run takes",
    )
    p.add_argument(
        "--recipe-flags",
        default="",
        help='--ablations: train.py flags for every train.py row, before the row\'s own (e.g. "--mask-rate 0.3")',
    )
    p.add_argument("--seeds", default="0,1,2", help="--ablations: the seeds, comma-separated (default 0,1,2)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="--ablations: train.py's --data (default: its own)")
    p.add_argument("--rows", help="--ablations: a subset of the rows, by number from 0 (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="--ablations: runs at a time (default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="--ablations: threads of each run")
    p.add_argument(
        "--ablations-json", default="ablations.json", help="--ablations: where the results go, for tools/plot_run.py"
    )
    p.add_argument("--ablation-job", help=argparse.SUPPRESS)
    p.add_argument("--context-lengths", default="8192,16384,32768", help="--long-context: the sequence lengths")
    p.add_argument("--long-context-child", help=argparse.SUPPRESS)
    p.add_argument(
        "--child", choices=["ours", "theirs", "ours_full", "ours_compiled", "theirs_compiled"], help=argparse.SUPPRESS
    )
    p.add_argument(
        "--attn",
        choices=[a for a in mb.ATTN_IMPLEMENTATIONS if a],
        help="our attention kernel (default: chosen from device and dtype, as the model chooses it)",
    )
    p.add_argument("--ours-impl", default="sdpa", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    modes = ("build", "kernels", "embeddings", "colbert", "long_context", "train", "ablations")
    modes = [f"--{m.replace('_', '-')}" for m in modes if vars(args)[m]]
    if len(modes) > 1:
        p.error(f"{' and '.join(modes)} are separate benchmarks: run one at a time")
    if args.ablations:
        count = len(ABLATIONS) + 1
        if args.rows and not all(r.isdigit() and int(r) < count for r in args.rows.split(",")):
            p.error(f"--rows: numbers from 0 to {count - 1}, comma-separated, not {args.rows!r}")
        if args.recipe_flags:  # a flag train.py refuses is its one-line error now, not after the first runs
            import train

            given = vars(train.parse_args(shlex.split(args.recipe_flags)))
            ran = {**train.DEFAULTS, "batch_tokens": ABLATION_BATCH_TOKENS}  # what every row runs with, unless given
            try:
                train.check_settings({**ran, **{k: given[k] for k in train.DEFAULTS if given.get(k) is not None}})
            except ValueError as e:
                p.error(f"--recipe-flags: {e}")
        numbers = (args.steps, args.jobs, args.threads, 1 if args.run_mlm_steps is None else args.run_mlm_steps)
        if not re.fullmatch(r"\d+(,\d+)*", args.seeds) or min(numbers) < 1:
            p.error(
                "--ablations: --seeds are whole numbers, comma-separated; --steps, --run-mlm-steps, --jobs and "
                "--threads at least 1"
            )
    if args.train and args.dtypes and "," in args.dtypes:
        p.error(f"--train times one dtype a run: give --dtypes fp32 or --dtypes bf16, not {args.dtypes}")
    if args.ablations or args.ablation_job:  # train.py picks its device, and the run_mlm way the same one
        return args, None
    if args.child or args.long_context_child:  # the parent passes --device, --workloads, --dtypes and --batch
        return args, None
    if args.long_context:  # a CPU measurement (RSS) of one sequence: fp32 unless asked, no workloads
        if args.device == "cuda":
            p.error("--long-context measures a CPU forward's memory: use --device cpu (or auto)")
        args.device, args.dtypes = "cpu", args.dtypes or "fp32"
    try:
        device = pick_device(args.device)
        apply_device_defaults(args, device)
    except ValueError as e:
        p.error(str(e))
    return args, device


def setups(device, dtypes, forced=None):
    """(dtype name, our attention kernel) per dtype: what ours picks by default, spelled out for the
    label and the memory children: flash on CUDA in bf16 where a kernel is found, sdpa otherwise.
    `forced` (--attn) overrides the choice, e.g. to time our SDPA path on a GPU."""
    out = []
    for d in dtypes:
        impl = forced or "sdpa"
        if device.type == "cuda" and d == "bf16" and not forced:
            if mb.find_flash_kernel(device) is not None:
                impl = "flash_attention_2"
            else:
                print(
                    f"no flash kernel ({mb.flash_kernel_missing(device)}); CUDA runs ours with sdpa", file=sys.stderr
                )
        out.append((d, impl))
    return out


def fmt(x, spec):
    """Formats a number; a failure ("OOM", "failed") stays as it is, None is n/a."""
    return "n/a" if x is None else x if isinstance(x, str) else format(x, spec)


def speed(r, name):
    """Real tokens/s of a variant in a row, formatted, or its failure."""
    s = r["secs"].get(name)
    return fmt(r["tok"] / s if isinstance(s, float) else s, ",.0f")


def ratio(r, fast, slow):
    """How many times faster `fast` ran than `slow` ('1.23x'), or n/a when either has no time."""
    a, b = r["secs"].get(fast), r["secs"].get(slow)
    return f"{b / a:.2f}x" if isinstance(a, float) and isinstance(b, float) else "n/a"


def mfu(r, name, ceilings):
    """Model FLOP/s of a variant over the matmul ceiling, formatted, or n/a."""
    s = r["secs"].get(name)
    return fmt(r["flops"] / s / ceilings[r["label"]] if isinstance(s, float) else None, ".1%")


def max_diffs(outs):
    """name -> max abs difference of its output from theirs (none when theirs has no output)."""
    ref = outs.get("theirs")
    return {
        k: (out.float() - ref.float()).abs().max().item()
        for k, out in outs.items()
        if ref is not None and k != "theirs"
    }


def run_workload(variants, w, device, args, deadline=None):
    """Checks ours against theirs on one workload, times every variant of every dtype in the same interleaved
    rounds, measures memory; returns one table row per dtype. `variants`: (dtype name, our kernel, label,
    models) per dtype. Timing the dtypes in the same rounds keeps bf16 against fp32 as fair as ours against
    theirs on a shared machine: timed after the fp32 rounds, as before, bf16 rounds took 10.5 s where the same
    forwards took 4.0 s alone minutes earlier (other processes' load)."""
    check_deadline(deadline)
    ids, mask = make_batch(w, args.batch_size, device)
    lengths = mask.sum(1).tolist()
    print(
        f"  {device.type} {w}: {len(lengths)} seqs, {sum(lengths)} real tokens, padded to {ids.shape[1]}",
        file=sys.stderr,
    )
    per_dtype = {d: forward_fns(models, w, ids, mask) for d, _, _, models in variants}
    fns = {f"{d} {name}": fn for d, own in per_dtype.items() for name, fn in own.items()}  # "bf16 ours", ...
    warmup = device.type == "cuda" or any(k.endswith("ours_compiled") for k in fns)
    results = time_interleaved(fns, args.repeats, device, warmup, deadline)
    flops = model_flops(lengths, int((ids == MASK_ID).sum()) if w == "e" else 0)
    rows = []
    for dname, impl, label, _ in variants:
        # this dtype's share of the results, keyed by variant name again
        secs, outs, first_secs = (
            {k.split(" ", 1)[1]: v for k, v in r.items() if k.startswith(f"{dname} ")} for r in results
        )
        own_fns = per_dtype[dname]
        diffs = max_diffs(outs)
        if diffs:
            print(
                f"    {dname} max abs diff vs theirs: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()),
                file=sys.stderr,
            )
        compiled_first = {k: first_secs[k] for k in own_fns if k.endswith("_compiled") and k in first_secs}
        if compiled_first:
            print(
                f"    {dname} first call (compiling) s: "
                + ", ".join(f"{k} {fmt(v, '.1f')}" for k, v in compiled_first.items()),
                file=sys.stderr,
            )
        # same weights, same inputs: the numbers must agree before speed counts (bf16: reported only)
        if dname == "fp32":
            for k in ("ours", "ours_compiled"):
                assert diffs.get(k, 0.0) < 1e-3, f"workload {w} fp32: {k} and theirs differ by {diffs[k]:.2e}"
        del outs
        failures = {k: v for k, v in secs.items() if isinstance(v, str)}
        mem = {} if args.no_memory else measure_memory(own_fns, failures, w, dname, device, args.batch_size, impl)
        row = dict(w=w, label=label, device=device.type, tok=sum(lengths), secs=secs, first=compiled_first)
        rows.append(row | dict(flops=flops, mem=mem, diff=diffs.get("ours")))
    return rows


def run_all(args, device, rows, ceilings, deadline=None):
    """Every dtype and workload asked for on the device: the dtypes' models are built first and timed together
    (see run_workload); rows are appended as they finish."""
    variants = []
    for dname, impl in setups(device, args.dtypes.split(","), args.attn):
        check_deadline(deadline)
        label = f"{device.type} {dname}" + (" (ours flash)" if impl == "flash_attention_2" else "")
        variants.append((dname, impl, label, build_models("both", DTYPES[dname], device, impl, args.compiled)))
    for w in args.workloads.split(","):  # the ceilings are re-measured between workloads; the best counts
        for dname, _, label, _ in variants:
            ceilings[label] = max(ceilings.get(label, 0.0), matmul_ceiling(DTYPES[dname], device))
        rows.extend(run_workload(variants, w, device, args, deadline))
    for dname, _, label, _ in variants:
        ceilings[label] = max(ceilings[label], matmul_ceiling(DTYPES[dname], device))


def batches_line(args, device):
    """What the batches hold, for the heading."""
    B = args.batch_size
    best = f"right-padded. Tokens/s count real tokens; best of {args.repeats}"
    best += ", every dtype's variants in the same interleaved rounds." if "," in args.dtypes else "."
    if device.type == "cuda":
        return (
            f"Batches (B = --gpu-batch {B}; the paper's sizes at 512): {B} sequences for a, b, e; "
            f"{max(1, B // 2)} of 512 for c; {max(1, B // 64)} of 8192 for d; {max(1, B // 16)} for f; {best}"
        )
    d = f"; {B // 64} of 8192 for d" if B // 64 > 1 else ""
    return f"Batches: {B} sequences for a, b, e; {max(1, B // 2)} of 512 for c{d}; {best}"


def print_heading(args, device, ceilings, stopped, compiled):
    """Machine, command, matmul ceilings, and what the columns mean."""
    command = f"`python bench.py {' '.join(sys.argv[1:])}`" + (f" ({stopped}: finished rows only)" if stopped else "")
    print(f"Machine: {machine_line()}  \nCommand: {command}  ")
    ceiling = ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in ceilings.items())
    print(f"Matmul ceiling (best seen during the run): {ceiling}\n")
    print(batches_line(args, device))
    print(
        "MFU = model FLOP/s (bench.model_flops: real tokens, windowed local attention) / the matmul ceiling "
        "in that dtype."
    )
    if device.type == "cuda":
        print(
            "Peak: extra GPU memory one forward needs above the loaded weights and inputs (max_memory_allocated "
            "in this process, one untimed forward of each variant after timing)."
        )
    else:
        print("Peak MB: extra memory one forward needs above the loaded weights and inputs, each in a fresh process.")
    if compiled:
        print(
            "Compiled: ours = a copy of ours with .compile() (each encoder layer, torch.compile(dynamic=True)); "
            "theirs = torch.compile(model.model), default options. First call s: the untimed warm-up call, "
            "compiling included. OOM: out of GPU memory; failed: theirs compiled raised (the message is on stderr)."
        )
    print("max abs diff: ours vs theirs on the real tokens' last hidden state (e: the logits at the masks).\n")


def md_row(cells):
    """One markdown table row."""
    return "| " + " | ".join(map(str, cells)) + " |"


def md_header(columns, left=1):
    """A markdown table's heading: the first `left` columns left-aligned, the numbers right-aligned."""
    return md_row(columns) + "\n|" + "---|" * left + "---:|" * (len(columns) - left)


def print_plain_table(rows, ceilings):
    """Ours vs theirs, eager: the CPU table."""
    columns = ["workload", "device, dtype", "real tokens", "ours tok/s", "theirs tok/s", "ours/theirs", "ours MFU"]
    print(md_header(columns + ["theirs MFU", "ours peak MB", "theirs peak MB", "max abs diff"], left=2))
    for r in rows:
        m = r["mem"]
        cells = [f"{r['w']}: {describe(r['w'], r['device'])}", r["label"], r["tok"], speed(r, "ours")]
        cells += [speed(r, "theirs"), f"**{ratio(r, 'ours', 'theirs')}**", mfu(r, "ours", ceilings)]
        cells += [mfu(r, "theirs", ceilings), fmt(m.get("ours"), ",.0f"), fmt(m.get("theirs"), ",.0f")]
        print(md_row(cells + [fmt(r["diff"], ".1e")]))


COMPILED_COLUMNS = (
    "workload | real tokens | ours tok/s | ours compiled tok/s | theirs tok/s | theirs compiled tok/s | "
    "ours compiled / theirs | ours compiled / theirs compiled | ours / theirs | MFU (ours compiled) | "
    "peak GB ours compiled | peak GB theirs | first call s ours compiled | first call s theirs compiled | max abs diff"
).split(" | ")


def peak_gb(r, name):
    """A variant's peak memory in GB, formatted, or its failure, or n/a."""
    mb_ = r["mem"].get(name)
    return fmt(mb_ / 1024 if isinstance(mb_, float) else mb_, ".2f")


def print_compiled_table(rows, ceilings):
    """The four variants, eager and compiled (the CUDA table), one table per device and dtype."""
    for i, label in enumerate(dict.fromkeys(r["label"] for r in rows)):
        print(("\n" if i else "") + f"**{label}**\n")
        print(md_header(COMPILED_COLUMNS))
        for r in (r for r in rows if r["label"] == label):
            cells = [f"{r['w']}: {describe(r['w'], r['device'])}", r["tok"]]
            cells += [speed(r, k) for k in ("ours", "ours_compiled", "theirs", "theirs_compiled")]
            cells += [ratio(r, "ours_compiled", "theirs"), f"**{ratio(r, 'ours_compiled', 'theirs_compiled')}**"]
            cells += [ratio(r, "ours", "theirs"), mfu(r, "ours_compiled", ceilings)]
            cells += [peak_gb(r, "ours_compiled"), peak_gb(r, "theirs")]
            cells += [fmt(r["first"].get(k), ".1f") for k in ("ours_compiled", "theirs_compiled")]
            print(md_row(cells + [fmt(r["diff"], ".1e")]))


def print_tables(args, device, rows, ceilings, stopped=None):
    """The markdown report: heading, the main table(s), and the fill-mask sparse-vs-full table."""
    compiled = [r for r in rows if "ours_compiled" in r["secs"]]
    plain = [r for r in rows if "ours_compiled" not in r["secs"]]
    print_heading(args, device, ceilings, stopped, compiled)
    if compiled:
        print_compiled_table(compiled, ceilings)
    if plain or not compiled:
        print("\n" if compiled else "", end="")
        print_plain_table(plain, ceilings)
    fill = [r for r in rows if r["w"] == "e"]
    if fill:
        print("\nFill-mask (e), ours two ways: sparse decoder (head + decoder on the masked rows only)", end="")
        print(" vs full-vocabulary logits.\n")
        columns = ["device, dtype", "sparse tok/s", "full-logits tok/s", "sparse/full", "full/theirs"]
        print(md_header(columns + ["sparse peak MB", "full peak MB"]))
        for r in fill:
            m = r["mem"]
            cells = [r["label"], speed(r, "ours"), speed(r, "ours_full"), ratio(r, "ours", "ours_full")]
            cells += [ratio(r, "ours_full", "theirs"), fmt(m.get("ours"), ",.0f"), fmt(m.get("ours_full"), ",.0f")]
            print(md_row(cells))


def layer_kernels(packing, device, window):
    """{(layer type, kernel name): fn()} with every way modernbert.py can run one attention layer on this
    packing: what `attention_kernels` chooses from, each called directly so the table can set them side by
    side. Flex's block masks are built here, once, as a forward builds them (their cost is a row of its own)."""
    cfg = mb.ModernBertConfig()
    H, D, T = cfg.num_attention_heads, cfg.head_dim, packing.indices.shape[0]
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(T, H, D, device=device, generator=g, dtype=dtype) for _ in range(3))

    flex = mb.flex_kernel(packing, window)  # flex_attention with its block masks, as a forward builds them
    fns = {
        ("both", "flex block masks (once a forward)"): lambda: mb.flex_kernel(packing, window),
        ("global", "flex"): lambda: flex(q, k, v, packing, None),
        ("local", "flex"): lambda: flex(q, k, v, packing, window),
        ("global", "sdpa masked grid"): lambda: mb.sdpa_attention(q, k, v, packing, None),
        ("local", "sdpa blocked local"): lambda: mb.local_block_attention(q, k, v, packing, window),
    }
    if packing.equal_lengths:
        fns[("global", "sdpa dense (equal lengths)")] = lambda: mb.sdpa_equal_lengths(q, k, v, packing)
    if device.type == "cpu":
        fns[("global", "sdpa per sequence")] = lambda: mb.sdpa_per_sequence(q, k, v, packing)
    varlen = mb.find_flash_kernel(device)
    if varlen is not None:
        flash = functools.partial(mb.flash_attention, varlen=varlen)
        fns[("global", "varlen flash")] = lambda: flash(q, k, v, packing, None)
        fns[("local", "varlen flash")] = lambda: flash(q, k, v, packing, window)
    else:
        note(f"no varlen flash kernel on {device.type}: {mb.flash_kernel_missing(device)}")
    return fns


def kernel_table(args, device):
    """--kernels: milliseconds per attention layer, global and local, for every kernel at each workload's
    shape (ModernBERT-base heads, bf16 on CUDA, fp32 on CPU), best of --repeats after an untimed round that
    compiles flex. Which kernel `attention_kernels` picks for each layer type rests on this table."""
    cfg = mb.ModernBertConfig()
    window = cfg.half_window
    print(f"Machine: {machine_line()}")
    print(f"Command: python bench.py {' '.join(sys.argv[1:])}\n")
    print(md_header(["workload", "real tokens", "layer", "kernel", "ms", "vs fastest of its layer type"], left=4))
    for w in args.workloads.split(","):
        _, mask = make_batch(w, args.batch_size, device)
        packing = mb.Packing.from_mask(mask)
        fns = layer_kernels(packing, device, window)
        named = {f"{layer} {name}": fn for (layer, name), fn in fns.items()}
        best, _, _ = time_interleaved(named, args.repeats, device, warmup=True)
        ms = {key: best[" ".join(key)] for key in fns}
        ms = {key: t if isinstance(t, str) else t * 1e3 for key, t in ms.items()}
        fastest = {}
        for (layer, _), t in ms.items():
            if not isinstance(t, str):
                fastest[layer] = min(fastest.get(layer, t), t)
        for (layer, name), t in ms.items():
            vs = "" if isinstance(t, str) or layer == "both" else f"{t / fastest[layer]:.2f}x"
            print(md_row([w, int(mask.sum()), layer, name, fmt(t, ".2f"), vs]))
        free_memory(device)


# ----------------------------------------------------------------------------------------------------
# --build: seconds to build ModernBERT-base for masked LM from a config, as training from scratch starts, ours
# against transformers' (both initialise every weight with the official truncated normal), interleaved.


def build_table(args):
    def builder(model_class, config_class):
        def build():  # built, initialised and dropped (freeing its memory is timed too, for both)
            model_class(config_class())

        return build

    builders = {
        "ours": builder(mb.ModernBertForMaskedLM, mb.ModernBertConfig),
        "theirs": builder(transformers.ModernBertForMaskedLM, transformers.ModernBertConfig),
    }
    best, _, _ = time_interleaved(builders, args.repeats, torch.device("cpu"), warmup=False, inference=False)
    print(f"Machine: {machine_line()}")
    print(f"Command: python bench.py {' '.join(sys.argv[1:])}\n")
    print(md_header(["built from a config", "ours s", "theirs s", "ours / theirs (time)"]))
    row = ["ModernBertForMaskedLM, ModernBERT-base", fmt(best["ours"], ".2f"), fmt(best["theirs"], ".2f")]
    print(md_row(row + [f"**{best['ours'] / best['theirs']:.2f}**"]))


@contextlib.contextmanager
def busy_core(on):
    """--busy-core: one process spinning on a core while the benchmark times, as when a machine is shared."""
    if not on:
        yield
        return
    note("one core is held by a busy loop while timing (--busy-core)")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


# ----------------------------------------------------------------------------------------------------
# --long-context: the family's 32K setting (issue 23): max_position_embeddings 32768 and YaRN on the global layers
# (factor 4 over the original 8192), ModernBERT-base dimensions, random weights, the encoder (ModernBertModel: an MLM
# decoder over 32,768 tokens would be a 6.6 GB logits tensor of its own), one sequence, on the CPU with our default
# kernels. Local layers: blocked attention, memory O(S * window). Global layers: one unmasked fused SDPA call, which
# works in tiles and never holds the S x S scores (4 GiB per head in fp32 at 32K), but computes all S^2 of them.

LONG_CONTEXT = dict(
    max_position_embeddings=32768,
    rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}},
)


def long_context_child(spec):
    """Child mode ("dtype:length"): one forward over one sequence. Returns seconds (the whole forward, and its
    global and local layers), the peak memory above the weights and input, the most one global or local layer
    adds to what was live before it, and the process's peak RSS, in MB."""
    dtype, length = spec.split(":")
    torch.manual_seed(0)
    model = mb.ModernBertModel(mb.ModernBertConfig(**LONG_CONTEXT)).to(DTYPES[dtype]).eval()
    ids = torch.randint(0, 50000, (1, int(length)))
    stats = {"global_s": 0.0, "local_s": 0.0, "global_mb": 0.0, "local_mb": 0.0, "peak_kb": 0}

    def peak_since_reset(since_kb=None):  # VmHWM, kept for the whole forward's peak; MB above since_kb
        hwm = proc_status_kb("VmHWM")
        stats["peak_kb"] = max(stats["peak_kb"], hwm)
        return None if since_kb is None else (hwm - since_kb) / 1024

    def before(layer, args):
        peak_since_reset()
        reset_peak_rss()
        layer.started = proc_status_kb("VmRSS"), time.perf_counter()

    def after(layer, args, out):
        kind = "local" if layer.attn.half_window else "global"
        rss, t = layer.started
        stats[f"{kind}_s"] += time.perf_counter() - t
        stats[f"{kind}_mb"] = max(stats[f"{kind}_mb"], peak_since_reset(rss))

    with torch.inference_mode():
        model(ids[:, :256])  # warm-up: first-call costs (thread pools, kernels) are not the length's
    for layer in model.layers:
        layer.register_forward_pre_hook(before)
        layer.register_forward_hook(after)
    gc.collect()
    base = proc_status_kb("VmRSS")
    reset_peak_rss()
    t = time.perf_counter()
    with torch.inference_mode():
        model(ids)
    seconds = time.perf_counter() - t
    peak_since_reset()
    return {"seconds": seconds, "peak_mb": (stats.pop("peak_kb") - base) / 1024, "rss_mb": base / 1024, **stats}


def long_context_table(args):
    """--long-context: each length (--context-lengths) and dtype in a fresh child process, one forward each."""
    config = mb.ModernBertConfig(**LONG_CONTEXT)
    globals_ = sum(map(config.is_global, range(config.num_hidden_layers)))
    load = os.getloadavg()
    rows = []
    for dtype in args.dtypes.split(","):
        for length in args.context_lengths.split(","):
            cmd = [sys.executable, __file__, "--long-context-child", f"{dtype}:{int(length)}"]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors go back to the OS: RSS is live
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode:
                raise SystemExit(f"--long-context {dtype} {length} failed:\n{res.stderr}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"    {dtype} {length}: {r}", file=sys.stderr)
            rows.append([f"{int(length):,}", dtype, fmt(r["seconds"], ".1f"), fmt(r["global_s"], ".1f")])
            rows[-1] += [fmt(r["local_s"], ".1f"), fmt(r["peak_mb"], ",.0f"), fmt(r["global_mb"], ",.0f")]
            rows[-1] += [fmt(r["local_mb"], ",.0f"), fmt(r["rss_mb"] + r["peak_mb"], ",.0f")]
    print(f"Machine: {machine_line()}  \nCommand: `python bench.py {' '.join(sys.argv[1:])}`  ")
    print(f"Date: {time.strftime('%Y-%m-%d')}; load average (1, 5, 15 min) before: {load}, after: {os.getloadavg()}\n")
    print(
        f"ModernBertModel, ModernBERT-base dimensions ({globals_} global, {config.num_hidden_layers - globals_} local "
        f"layers), {LONG_CONTEXT}, one sequence, one forward in a fresh process each, inference mode.\n"
    )
    columns = ["tokens", "dtype", "forward s", "global layers s", "local layers s", "peak MB above weights + input"]
    print(md_header(columns + ["most one global layer adds, MB", "most one local layer adds, MB", "process peak MB"]))
    for row in rows:
        print(md_row(row))


# ----------------------------------------------------------------------------------------------------
# --embeddings: embed.load_embedder's encode (texts sorted by length, packed batches by token budget) against
# sentence-transformers' SentenceTransformer.encode with its defaults (batches of 32 texts, padded), on the
# same random weights and the same texts, checked to agree before timing.

# jhu-clsp/ettin-encoder-32m's shape: hidden 384 and 10 layers (its model card); intermediate 576 (1.5 x hidden,
# as every ModernBERT, which gives the 31.9M backbone parameters quoted for it); 6 heads of 64 (assumed).
ETTIN_32M = dict(hidden_size=384, intermediate_size=576, num_hidden_layers=10, num_attention_heads=6)


def embedding_corpus(tokenizer, n, seed=1234):
    """n texts whose lengths are log-uniform in [16, 2048] tokens: words that the tokenizer makes one token
    each (" word"), so that a text of L - 2 words is L tokens with [CLS] and [SEP] (its first word, without
    the space, may take one or two more)."""
    g = torch.Generator().manual_seed(seed)
    candidates = sorted(w[1:] for w in tokenizer.get_vocab() if w.startswith("Ġ") and w[1:].isalpha())
    encodings = tokenizer.encode_batch([" " + w for w in candidates], add_special_tokens=False)
    words = [w for w, e in zip(candidates, encodings) if len(e.ids) == 1]
    lengths = torch.empty(n).uniform_(math.log(16), math.log(2048), generator=g).exp().round().long()
    return [" ".join(words[i] for i in torch.randint(len(words), (L - 2,), generator=g).tolist()) for L in lengths]


def shared_tokenizer_json(flag):
    """../shared/data/modernbert-base/tokenizer.json (or under MODERNBERT_SHARED_DATA), which `flag` needs."""
    here = os.path.dirname(os.path.abspath(__file__))
    shared = os.environ.get("MODERNBERT_SHARED_DATA", os.path.join(here, "..", "shared", "data"))
    tokenizer_json = os.path.join(shared, "modernbert-base", "tokenizer.json")
    if not os.path.isfile(tokenizer_json):
        raise SystemExit(f"{flag} needs the ModernBERT tokenizer: no {tokenizer_json} (MODERNBERT_SHARED_DATA)")
    return tokenizer_json


def bench_embeddings(args, device):
    """Builds a random ettin-encoder-32m-sized embedding model (mean pooling + Normalize) with
    sentence-transformers, loads it both ways, checks the embeddings agree, times encode interleaved (best of
    --repeats) and prints the table."""
    import shutil
    import tempfile
    from importlib.metadata import version

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from tokenizers import Tokenizer

    import embed
    import load

    tokenizer_json = shared_tokenizer_json("--embeddings")
    texts = embedding_corpus(Tokenizer.from_file(tokenizer_json), args.texts or 256)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        transformers.ModernBertModel(transformers.ModernBertConfig(**ETTIN_32M)).save_pretrained(folder)
        for name in load.TOKENIZER_FILES:
            shutil.copyfile(os.path.join(os.path.dirname(tokenizer_json), name), os.path.join(folder, name))
        modules = [Transformer(folder), Pooling(ETTIN_32M["hidden_size"], "mean"), Normalize()]
        SentenceTransformer(modules=modules, device=device.type).save(folder, create_model_card=False)
        theirs = SentenceTransformer(folder, device=device.type)  # as users load it
        ours = embed.load_embedder(folder, device=device)
        tokens = [len(e.ids) for e in ours.tokenizer.encode_batch(texts)]
        n, total = len(texts), sum(tokens)
        print(f"  {n} texts, {total} tokens (mean {total / n:.0f}, longest {max(tokens)})", file=sys.stderr)
        fns = {
            "ours": lambda: torch.from_numpy(ours.encode(texts)),
            "theirs": lambda: torch.from_numpy(theirs.encode(texts)),
        }
        secs, outs, _ = time_interleaved(fns, args.repeats, device, warmup=device.type == "cuda")
    diff = (outs["ours"].float().cpu() - outs["theirs"].float()).abs().max().item()
    assert diff < 1e-4, f"ours and SentenceTransformer.encode differ by {diff:.2e}"  # fp32, unit vectors
    print(f"Machine: {machine_line()}  \nCommand: `python bench.py {' '.join(sys.argv[1:])}`  \n")
    print(
        f"Corpus: {n} texts of random words, lengths log-uniform in [16, 2048] tokens ({total} tokens, mean "
        f"{total / n:.0f}, longest {max(tokens)}). Model: ettin-encoder-32m's shape {ETTIN_32M}, random weights, "
        "mean pooling + Normalize, fp32. Theirs: SentenceTransformer.encode(texts) with its defaults "
        f"(sentence-transformers {version('sentence-transformers')}: batches of 32 texts, padded). Ours: "
        f"load_embedder(folder).encode(texts) (packed batches of up to {embed.BATCH_TOKENS} tokens). "
        f"Best of {args.repeats}, interleaved.\n"
    )
    columns = ["texts", "tokens", "ours s", "theirs s", "ours tok/s", "theirs tok/s", "ours/theirs", "max abs diff"]
    row = {"secs": secs, "tok": total}
    cells = [n, total, fmt(secs["ours"], ".2f"), fmt(secs["theirs"], ".2f"), speed(row, "ours"), speed(row, "theirs")]
    print(md_header(columns) + "\n" + md_row(cells + [f"**{ratio(row, 'ours', 'theirs')}**", f"{diff:.1e}"]))


# ----------------------------------------------------------------------------------------------------
# --colbert: embed.load_colbert's encode of documents against PyLate's ColBERT.encode with its defaults (batches of
# 32 texts, padded), on the same random weights and texts, checked to agree before timing. PyLate pins
# sentence-transformers 5.3 and transformers <= 5.3, so this runs in PyLate's own environment (the recipe is at
# the top of tools/make_pylate_goldens.py), not in the tests'.


def bench_colbert(args, device):
    """Saves a random ettin-encoder-32m-sized ColBERT with PyLate (its defaults but GTE-ModernColBERT's document
    length, 300), loads it both ways, checks the document vectors agree, times encode(is_query=False)
    interleaved (best of --repeats) and prints the table."""
    import logging
    import shutil
    import tempfile
    from importlib.metadata import version

    from tokenizers import Tokenizer

    import embed
    import load

    try:
        from pylate import models
    except ImportError:
        raise SystemExit("--colbert needs PyLate: run it in PyLate's environment (tools/make_pylate_goldens.py)")
    logging.getLogger("pylate").setLevel(logging.ERROR)  # its notes on adding the Dense and the prefix tokens
    tokenizer_json = shared_tokenizer_json("--colbert")
    texts = embedding_corpus(Tokenizer.from_file(tokenizer_json), args.texts or 2000)
    with tempfile.TemporaryDirectory() as work:
        base, folder = os.path.join(work, "base"), os.path.join(work, "colbert")
        transformers.ModernBertModel(transformers.ModernBertConfig(**ETTIN_32M)).save_pretrained(base)
        for name in load.TOKENIZER_FILES:
            shutil.copyfile(os.path.join(os.path.dirname(tokenizer_json), name), os.path.join(base, name))
        colbert = models.ColBERT(base, device=device.type, embedding_size=128, document_length=300)
        colbert.save(folder, create_model_card=False)
        theirs = models.ColBERT(folder, device=device.type)  # as users load it
        ours = embed.load_colbert(folder, device=device)
        tokens = [len(ids) for ids in ours.tokenize(texts, is_query=False)[0]]
        n, total = len(texts), sum(tokens)
        print(f"  {n} documents, {total} tokens (mean {total / n:.0f}, longest {max(tokens)})", file=sys.stderr)
        fns = {
            "ours": lambda: ours.encode(texts, is_query=False, convert_to_tensor=True),
            "theirs": lambda: theirs.encode(texts, is_query=False, convert_to_tensor=True),
        }
        secs, outs, _ = time_interleaved(fns, args.repeats, device, warmup=device.type == "cuda")
    assert [len(m) for m in outs["ours"]] == [len(m) for m in outs["theirs"]], "other tokens kept"
    diff = max((a.float().cpu() - b.float().cpu()).abs().max().item() for a, b in zip(outs["ours"], outs["theirs"]))
    assert diff < 1e-4, f"ours and PyLate's ColBERT.encode differ by {diff:.2e}"  # fp32, unit vectors
    print(f"Machine: {machine_line()}  \nCommand: `python bench.py {' '.join(sys.argv[1:])}`  \n")
    print(
        f"Corpus: {n} documents of random words, lengths log-uniform in [16, 2048] tokens, truncated at 300 "
        f"({total} tokens, mean {total / n:.0f}). Model: ettin-encoder-32m's shape {ETTIN_32M}, random weights, "
        "a Dense to 128, saved by PyLate (document_length 300, its punctuation skip-list), fp32. Theirs: "
        f"ColBERT.encode(texts, is_query=False) with its defaults (pylate {version('pylate')}: batches of 32 texts, "
        "padded). Ours: load_colbert(folder).encode(texts, is_query=False) (packed batches of up to "
        f"{embed.BATCH_TOKENS} tokens). Best of {args.repeats}, interleaved.\n"
    )
    columns = [
        "documents",
        "tokens",
        "ours s",
        "theirs s",
        "ours tok/s",
        "theirs tok/s",
        "ours/theirs",
        "max abs diff",
    ]
    row = {"secs": secs, "tok": total}
    cells = [n, total, fmt(secs["ours"], ".2f"), fmt(secs["theirs"], ".2f"), speed(row, "ours"), speed(row, "theirs")]
    print(md_header(columns) + "\n" + md_row(cells + [f"**{ratio(row, 'ours', 'theirs')}**", f"{diff:.1e}"]))


# ----------------------------------------------------------------------------------------------------
# --train: one full training step (forward, backward, optimizer step) of ModernBERT-base's masked LM, ours as
# train.py runs it against transformers' as people train it, on the same documents with the same masked tokens:
#   ours               the documents packed into one stream (cu_seqlens), sparse prediction, StableAdamW;
#   theirs padded      one document a row, right-padded, dense logits over every position (run_mlm.py with
#                      --line_by_line and dynamic padding: DataCollatorForLanguageModeling), torch's AdamW;
#   theirs flattened   transformers' DataCollatorWithFlattening: the documents in one (1, T) row, position_ids
#                      restarting at 0 (padding-free); dense logits, AdamW. transformers keeps the documents apart
#                      only with flash_attention_2; with sdpa (a CPU) they attend to each other, so its loss differs.
# Both sides get the same masks (30%, drawn by train.mask_tokens), so the loss of ours and theirs padded agree.


def train_step_fns(workload, batch, device, dtype):
    """name -> one training step (returns its loss), for ours and both of theirs on one workload's documents."""
    import train

    ids, mask = make_batch(workload, batch, device)
    lengths = mask.sum(1).tolist()
    documents = [row[:n].tolist() for row, n in zip(ids.cpu(), lengths)]
    vocab = train.Vocab(size=50280, mask=MASK_ID, pad=50283, cls=50281, sep=50282)  # ModernBERT's tokenizer ids
    packed = train.pack(documents, sum(lengths), vocab.pad, max(lengths))  # one stream, no padding left over
    masked = train.mask_tokens(packed, 0.3, vocab, torch.Generator().manual_seed(0)).to(device)
    n_masked = int((masked.labels != train.IGNORE).sum())
    models = build_models("both", torch.float32, device, "sdpa" if device.type == "cpu" else None)
    ours, theirs = models["ours"].train(), models["theirs"].train()
    ours.config.sparse_prediction = True
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)
    flat_model = copy.deepcopy(theirs)  # its own copy and optimizer: all three start from the same weights
    ours_opt = train.StableAdamW(train.param_groups(ours, 1e-5), lr=8e-4)
    theirs_opt, flat_opt = (torch.optim.AdamW(m.parameters(), lr=5e-5) for m in (theirs, flat_model))  # Trainer's

    def rows(t, fill):  # the stream's documents as right-padded rows
        return torch.nn.utils.rnn.pad_sequence(t[0].split(lengths), batch_first=True, padding_value=fill)

    padded = {"input_ids": rows(masked.input_ids, 50283), "attention_mask": mask, "labels": rows(masked.labels, -100)}
    documents = zip(masked.input_ids[0].split(lengths), masked.labels[0].split(lengths))
    features = [{"input_ids": i.tolist(), "labels": y.tolist()} for i, y in documents]
    flat = transformers.DataCollatorWithFlattening(return_tensors="pt")(features)
    flat = {k: v.to(device) for k, v in flat.items()}

    def step(model, optimizer, inputs):  # as transformers' Trainer steps, without its bookkeeping
        def run():
            with autocast():
                loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach().float()

        return run

    fns = {
        "ours": lambda: train.train_step(ours, ours_opt, [masked], ([n_masked], n_masked), autocast).float(),
        "theirs padded": step(theirs, theirs_opt, padded),
        "theirs flattened": step(flat_model, flat_opt, flat),
    }
    return fns, sum(lengths), mask.numel()


def bench_train(args, device):
    """Times the three training steps on each workload (interleaved, best of --repeats), checks that ours and
    theirs padded start from the same loss, and prints the table."""
    dtype_name = args.dtypes.split(",")[0]
    table = []
    for w in args.workloads.split(","):
        fns, real, padded = train_step_fns(w, args.batch_size, device, DTYPES[dtype_name])
        secs, first, _ = time_interleaved(fns, args.repeats, device, warmup=True, inference=False)
        table.append({"w": w, "secs": secs, "tok": real, "padded": padded, "loss": first})
        free_memory(device)
    print(f"Machine: {machine_line()}  \nCommand: `python bench.py {' '.join(sys.argv[1:])}`  \n")
    print(
        f"One training step of ModernBERT-base's masked LM ({dtype_name}; random weights, the same for all): "
        f"B = {args.batch_size} sequences a workload, 30% of the real tokens masked (the same ones for all). "
        "Ours: train.py's step (packed stream with cu_seqlens, sparse prediction, StableAdamW). Theirs padded: "
        "run_mlm.py's batches (one document a row, dense logits, AdamW). Theirs flattened: "
        "DataCollatorWithFlattening's padding-free row (dense logits, AdamW"
        + ("; on sdpa its documents attend to each other" if device.type == "cpu" else "")
        + f"). Tokens/s count real tokens; best of {args.repeats} after an untimed round, interleaved. "
        "Losses: each one's first step, from the same weights (theirs flattened also loses the first token of "
        "each document, which the collator labels -100).\n"
    )
    columns = ["workload", "real tokens", "padded tokens", "ours tok/s", "theirs padded tok/s"]
    columns += [
        "theirs flattened tok/s",
        "ours / theirs padded",
        "ours / theirs flattened",
        "losses (ours, padded, flat)",
    ]
    print(md_header(columns))
    for r in table:
        cells = [f"{r['w']}: {describe(r['w'], device.type)}", r["tok"], r["padded"], speed(r, "ours")]
        cells += [speed(r, "theirs padded"), speed(r, "theirs flattened")]
        cells += [f"**{ratio(r, 'ours', 'theirs padded')}**", f"**{ratio(r, 'ours', 'theirs flattened')}**"]
        losses = [r["loss"].get(k) for k in ("ours", "theirs padded", "theirs flattened")]  # None: OOM or failed
        print(md_row(cells + [", ".join("-" if x is None else f"{float(x):.4f}" for x in losses)]))
    for r in table:
        if r["loss"].get("ours") is None or r["loss"].get("theirs padded") is None:
            continue  # a failed variant is in the table as OOM or failed
        diff = abs(float(r["loss"]["ours"]) - float(r["loss"]["theirs padded"]))
        assert diff < (1e-4 if DTYPES[dtype_name] == torch.float32 else 5e-2), f"{r['w']}: losses differ by {diff}"


# --ablations: what each piece of train.py's recipe buys. Each row is train.py's default run with one piece
# switched to its classic counterpart (one flag), trained for the same number of steps of the same batch shape
# (ABLATION_BATCH_TOKENS positions a step) on the same documents, once per seed, and scored by the same held-out
# evaluation: train.py's own, 15% of the held-out tokens masked, the same masks for every row of a seed. The
# reference row is the way people train with transformers (run_mlm.py): its ModernBertForMaskedLM, the texts
# concatenated and cut into --max-len blocks across documents, DataCollatorForLanguageModeling's 15% masking,
# dense logits, torch's AdamW (Trainer's defaults: no weight decay, gradient norm clipped at 1) at the same
# peak learning rate with linear warmup and decay; it gets train.py's tokenizer, and its weights are scored by
# loading them into modernbert.py's model (the same state_dict keys).
ABLATIONS = {  # row -> train.py's flags
    "the recipe (train.py's defaults)": [],
    "packing off: one document a row, padded": ["--no-packing"],
    "15% masking instead of 30%": ["--mask-rate", "0.15"],
    "dense prediction: every position decoded": ["--dense-prediction"],
    "AdamW (clipped gradients) instead of StableAdamW": ["--optimizer", "adamw"],
    "linear decay instead of warmup-stable-decay": ["--schedule", "linear"],
}
RUN_MLM = "run_mlm.py's way, with transformers"
ABLATION_BATCH_TOKENS = 2048  # the run_mlm way's 4 blocks of 512, for every row: equal steps are equal tokens


def ablation_job(job):
    """One row and seed, in its own process: train.py's run (a child process of its own), or the run_mlm way
    here. Returns held-out accuracy, real tokens seen and seconds a step."""
    if job["row"] == RUN_MLM:
        return run_mlm_way(job["steps"], job["seed"], job["data"], job["out"])
    flags = ["--steps", str(job["steps"]), "--seed", str(job["seed"]), "--out", job["out"]]
    flags += ["--data", *job["data"]] if job["data"] else []
    from safetensors import safe_open

    run = subprocess.run(
        [sys.executable, "train.py", *flags, "--evals", "1", "--batch-tokens", str(ABLATION_BATCH_TOKENS)]
        + [*job["recipe_flags"], *ABLATIONS[job["row"]]],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    if run.returncode:
        raise RuntimeError(f"train.py {' '.join(flags)} failed:\n{run.stderr[-2000:]}")
    with open(os.path.join(job["out"], "trainer_state.json")) as f:
        state = json.load(f)
    path = os.path.join(job["out"], f"checkpoint-{state['global_step']}", "optimizer.safetensors")
    with safe_open(path, "pt") as f:
        seconds = float(f.metadata()["train_seconds"])
    evals = [e for e in state["log_history"] if "eval_accuracy" in e]
    return {
        "accuracy": evals[-1]["eval_accuracy"],
        "tokens": state["num_input_tokens_seen"],
        "step_s": seconds / job["steps"],
    }


def run_mlm_way(steps, seed, data, out):
    """transformers' ModernBertForMaskedLM trained as run_mlm.py trains it (see above), scored by train.py."""
    import load
    import train

    settings = {**train.DEFAULTS, "seed": seed, "steps": steps, "batch_tokens": ABLATION_BATCH_TOKENS}
    budget, max_len = settings["batch_tokens"], settings["max_len"]
    documents = train.read_documents(data)
    train_docs, held_docs = train.split_held_out(documents)
    os.makedirs(out, exist_ok=True)
    train.save_tokenizer(train.train_tokenizer(train_docs, settings["vocab"]), out, max_len)
    tokenizer = load.load_tokenizer(out)
    tokenizer.no_padding()
    vocab = train.read_vocab(tokenizer)
    stream = [t for piece in train.tokenize(tokenizer, vocab, train_docs, max_len) for t in piece]  # [CLS] doc [SEP]..
    blocks = torch.tensor(stream[: len(stream) // max_len * max_len]).view(-1, max_len)  # group_texts
    if len(blocks) < budget // max_len:
        raise ValueError(f"the run_mlm way needs {budget:,} tokens of training text; this has {len(stream):,}")
    held_out = train.held_out_batches(train.tokenize(tokenizer, vocab, held_docs, max_len), settings, vocab)

    device = mb.pick_device()  # the device train.py's rows train on
    held_out = [b.to(device) for b in held_out]
    config = train.new_config(settings, vocab)
    theirs_config = transformers.ModernBertConfig.from_dict(config.to_dict(), attn_implementation="sdpa")
    theirs_config.sparse_prediction = False  # dense logits, as run_mlm.py computes them
    torch.manual_seed(seed)
    model = transformers.ModernBertForMaskedLM(theirs_config).train().to(device)
    collator = transformers.DataCollatorForLanguageModeling(
        transformers.AutoTokenizer.from_pretrained(out), mlm_probability=0.15, return_tensors="pt"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.0)
    warmup = round(0.05 * steps)  # train.py's warmup
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, warmup, steps)
    rows, order, seconds = budget // max_len, [], 0.0
    for step in range(steps):
        if len(order) < rows:  # a fresh shuffle each epoch, as Trainer's sampler
            order += torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed * 1000 + step)).tolist()
        t0 = time.perf_counter()
        inputs = collator([{"input_ids": blocks[i]} for i in order[:rows]])
        del order[:rows]
        loss = model(input_ids=inputs["input_ids"].to(device), labels=inputs["labels"].to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds += time.perf_counter() - t0
    ours = mb.ModernBertForMaskedLM(config).to(device)
    ours.load_state_dict(model.state_dict())
    _, accuracy = train.evaluate(ours, held_out, contextlib.nullcontext)
    return {"accuracy": accuracy, "tokens": steps * rows * max_len, "step_s": seconds / steps}


def bench_ablations(args):
    """Every row and seed (--jobs at a time, each its own process with --threads threads), then the table; the
    results also go to --ablations-json for tools/plot_run.py."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    every = [*ABLATIONS, RUN_MLM]
    rows = every if args.rows is None else [every[int(i)] for i in args.rows.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    data = [os.path.abspath(p) for p in args.data] if args.data else None  # train.py runs in this file's folder
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    steps = {r: args.run_mlm_steps if r == RUN_MLM and args.run_mlm_steps is not None else args.steps for r in rows}
    shared = {"data": data, "recipe_flags": shlex.split(args.recipe_flags)}  # the same for every run
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [
            {"row": r, "seed": s, "steps": steps[r], "out": os.path.join(tmp, f"{i}-{s}"), **shared}
            for i, r in enumerate(rows)
            for s in seeds
        ]

        def one(job):
            run = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--ablation-job", json.dumps(job)],
                capture_output=True,
                text=True,
                env=env,
            )
            if run.returncode:
                raise RuntimeError(f"{job['row']}, seed {job['seed']}:\n{run.stderr[-3000:]}")
            result = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{job['row']}, seed {job['seed']}: accuracy {result['accuracy']:.4f}", file=sys.stderr, flush=True)
            return {**job, **result}

        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(one, jobs))
    for job in results:
        del job["out"]
    print_ablations(args, rows, seeds, results)
    with open(args.ablations_json, "w") as f:
        json.dump(
            {"command": f"python bench.py {' '.join(sys.argv[1:])}", "machine": machine_line(), "results": results},
            f,
            indent=1,
        )


def print_ablations(args, rows, seeds, results):
    print(f"Machine: {machine_line()}  \nCommand: `python bench.py {' '.join(sys.argv[1:])}`  \n")
    data = " ".join(args.data) if args.data else "this Python's standard-library docstrings"
    print(
        f"{args.steps} steps of {ABLATION_BATCH_TOKENS:,} token positions each"
        + (f" ({args.run_mlm_steps} for the run_mlm way)" if args.run_mlm_steps is not None else "")
        + f", on {data}; seeds "
        f"{', '.join(map(str, seeds))}. Held-out masked-token accuracy (15% masked, the same masks for every row): "
        "mean and standard deviation over the seeds. Tokens: real tokens trained on. Seconds a step: mean, with "
        f"{args.jobs} run(s) at a time of {args.threads} thread(s) each.\n"
    )
    print(md_header(["run", "held-out accuracy", "vs the recipe", "tokens seen", "s / step"]))
    means = {}
    for row in rows:
        mine = [r for r in results if r["row"] == row]
        acc = torch.tensor([r["accuracy"] for r in mine], dtype=torch.float64)
        means[row] = acc.mean().item()
        spread = f" ± {acc.std().item():.3f}" if len(acc) > 1 else ""
        base = means.get(rows[0])
        cells = [row, f"{means[row]:.3f}{spread}", f"{means[row] / base:.2f}x" if base else "-"]
        cells += [
            f"{sum(r['tokens'] for r in mine) / len(mine):,.0f}",
            f"{sum(r['step_s'] for r in mine) / len(mine):.2f}",
        ]
        print(md_row(cells))


def main():
    """Parses flags, then runs the child mode or the whole benchmark and prints the tables."""
    start = time.perf_counter()
    args, device = parse_args()
    if args.child:
        print(json.dumps({"peak_mb": child_peak_mb(args)}))
        return
    if args.long_context_child:
        print(json.dumps(long_context_child(args.long_context_child)))
        return
    if args.ablation_job:
        print(json.dumps(ablation_job(json.loads(args.ablation_job))))
        return
    with busy_core(args.busy_core):
        run_mode(args, device, start)


def run_mode(args, device, start):
    """The mode the flags ask for: --build, --kernels, --embeddings, --colbert, --long-context, --train, or the
    forwards."""
    if args.build:
        build_table(args)
        return
    if args.kernels:
        kernel_table(args, device)
        return
    if args.embeddings:
        bench_embeddings(args, device)
        return
    if args.colbert:
        bench_colbert(args, device)
        return
    if args.long_context:
        long_context_table(args)
        return
    if args.train:
        bench_train(args, device)
        return
    if args.ablations:
        bench_ablations(args)
        return
    deadline = None if args.time_limit is None else start + args.time_limit
    rows, ceilings, stopped = [], {}, None
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` too still prints finished rows
    try:
        run_all(args, device, rows, ceilings, deadline)
    except KeyboardInterrupt as e:  # a long run stopped early still reports what it finished
        stopped = f"time limit of {args.time_limit:g} s reached" if isinstance(e, TimeLimit) else "interrupted"
        print(f"stopped: {stopped}", file=sys.stderr)
    except Exception:  # an error (a failed check too) on a long GPU run should not lose the finished rows
        traceback.print_exc()
        print_tables(args, device, rows, ceilings, "stopped by an error, traceback on stderr")
        sys.exit(1)
    print_tables(args, device, rows, ceilings, stopped)


if __name__ == "__main__":
    main()
