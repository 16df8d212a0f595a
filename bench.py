"""Throughput and memory of modernbert.py against Hugging Face transformers' ModernBERT.

Both models get the same random ModernBERT-base weights (transformers' defaults, copied into ours),
run in the same process on the same right-padded batches, interleaved, best of --repeats. Peak memory
comes from fresh child processes (this file re-run with --child). Prints a markdown table for README.md.

    python bench.py                                  # everything
    python bench.py --workloads a,c --dtypes fp32 --repeats 1 --no-memory   # a quick look
"""

import argparse
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import time

import torch
import transformers
import transformers.initialization

import modernbert as mb

MASK_ID = 50284  # [MASK] in the ModernBERT tokenizer
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WORKLOADS = {  # name: (description, lengths(batch, generator))
    "a": ("variable short: len ~ N(256, 64) in [32, 512], B seqs", lambda b, g: (torch.randn(b, generator=g) * 64 + 256).round().clamp(32, 512)),
    "b": ("uniform: len ~ U[32, 512], B seqs", lambda b, g: torch.randint(32, 513, (b,), generator=g).float()),
    "c": ("fixed 512, B/2 seqs", lambda b, g: torch.full((max(1, b // 2),), 512.0)),
    "d": ("one 8192-token sequence", lambda b, g: torch.tensor([8192.0])),
    "e": ("fill-mask, lengths as (a), 3 masks per seq", lambda b, g: (torch.randn(b, generator=g) * 64 + 256).round().clamp(32, 512)),
    "f": ("GPU variable long: len ~ N(4096, 1024) in [32, 8192], B seqs", lambda b, g: (torch.randn(b, generator=g) * 1024 + 4096).round().clamp(32, 8192)),
}


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


def fast_trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
    """Clamped normal: torch's rejection-sampling trunc_normal_ takes a minute per model on 2 cores,
    and the weights are random anyway (both models get the same ones)."""
    with torch.no_grad():
        return tensor.normal_(mean, std, generator=generator).clamp_(a, b)


def build_models(which, dtype, device, ours_impl):
    """Random ModernBERT-base MLM models: theirs (sdpa) and/or ours with theirs' weights copied in."""
    torch.manual_seed(0)
    torch.nn.init.trunc_normal_ = transformers.initialization.TORCH_INIT_FUNCTIONS["trunc_normal_"] = fast_trunc_normal_
    models = {}
    if which in ("both", "theirs"):
        models["theirs"] = transformers.ModernBertForMaskedLM._from_config(transformers.ModernBertConfig(), attn_implementation="sdpa")
    if which in ("both", "ours"):
        models["ours"] = mb.ModernBertForMaskedLM(mb.ModernBertConfig(attn_implementation=ours_impl))
        if "theirs" in models:
            models["ours"].load_state_dict(models["theirs"].state_dict(), strict=True)
    return {k: m.to(device=device, dtype=dtype).eval() for k, m in models.items()}


def forward_fns(models, workload, ids, mask):
    """name -> zero-argument forward returning what is compared: hidden states of real tokens
    (a-d, f) or the vocabulary logits at the [MASK] positions (e)."""
    ours, theirs, real = models.get("ours"), models.get("theirs"), mask.bool()
    if workload != "e":
        return {
            "ours": lambda: ours.model(ids, mask).last_hidden_state[real],
            "theirs": lambda: theirs.model(input_ids=ids, attention_mask=mask).last_hidden_state[real],
        }

    def ours_sparse():
        """encode, then head + decoder on the masked rows only."""
        hidden, packing, _ = ours.model.encode(ids, mask)
        rows = mb.unpad(ids, packing.indices) == MASK_ID
        return ours.decoder(ours.head(hidden[rows]))

    return {  # the full-logits ones do what the fill-mask pipeline does: all logits, then the masks
        "ours": ours_sparse,
        "theirs": lambda: theirs(input_ids=ids, attention_mask=mask).logits[ids == MASK_ID],
        "ours_full": lambda: ours(ids, mask).logits[ids == MASK_ID],
    }


def sync(device):
    """Wait for queued GPU work, so wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns, repeats, device):
    """Best seconds per fn over `repeats` rounds (order alternating each round), plus each fn's first
    output. On CUDA an untimed warm-up round comes first; on CPU round 0 is timed too (first-call
    overhead is milliseconds against forwards of seconds)."""
    best, first = {k: float("inf") for k in fns}, {}
    names = list(fns)
    with torch.inference_mode():
        for r in range(-1 if device.type == "cuda" else 0, repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                sync(device)
                t = time.perf_counter()
                out = fns[name]()
                sync(device)
                if r >= 0:
                    best[name] = min(best[name], time.perf_counter() - t)
                first.setdefault(name, out)
                print(f"    {name:9s} round {r}: {time.perf_counter() - t:7.2f}s", file=sys.stderr)
    return best, first


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


def child_peak_mb(args):
    """Child mode: one forward of one model; its peak memory above the loaded weights and inputs, in MB."""
    device, name = torch.device(args.device), args.child
    models = build_models("theirs" if name == "theirs" else "ours", DTYPES[args.dtypes], device, args.ours_impl)
    ids, mask = make_batch(args.workloads, args.batch, device)
    fn = forward_fns(models, args.workloads, ids, mask)[name]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = proc_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS: model construction peaks do not count
    with torch.inference_mode():
        fn()
    return (proc_status_kb("VmHWM") - base) / 1024


def peak_mb(name, workload, dtype, device, batch, ours_impl):
    """Runs this file as a child for one (model, workload) and returns its peak MB, or None on failure.
    glibc's mmap threshold is pinned so freed tensors go back to the OS and RSS follows live memory."""
    cmd = [sys.executable, __file__, "--child", name, "--workloads", workload, "--dtypes", dtype, "--device", device.type, "--batch", str(batch), "--ours-impl", ours_impl]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        print(f"    memory child {name} failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]


def machine_line():
    """CPU/GPU model, core count and library versions, for the table's heading."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads){gpu}; torch {torch.__version__}, transformers {transformers.__version__}"


def setups(dtypes):
    """(device, dtype name, our attention kernel) to run: CPU in each dtype, CUDA bf16 with flash."""
    out = [(torch.device("cpu"), d, "sdpa") for d in dtypes]
    if torch.cuda.is_available() and "bf16" in dtypes:
        try:
            mb.find_flash_kernel(torch.device("cuda"))
            out.append((torch.device("cuda"), "bf16", "flash_attention_2"))
        except RuntimeError as e:
            print(f"no flash kernel ({e}); CUDA runs ours with sdpa", file=sys.stderr)
            out.append((torch.device("cuda"), "bf16", "sdpa"))
    return out


def fmt(x, spec):
    """Formats a number, or n/a for None."""
    return "n/a" if x is None else format(x, spec)


def run_workload(models, w, label, dname, device, impl, args):
    """Checks ours against theirs on one workload, times both, measures memory; returns a table row."""
    ids, mask = make_batch(w, args.batch, device)
    lengths = mask.sum(1).tolist()
    print(f"  {label} {w}: {len(lengths)} seqs, {sum(lengths)} real tokens, padded to {ids.shape[1]}", file=sys.stderr)
    fns = forward_fns(models, w, ids, mask)
    secs, outs = time_interleaved(fns, args.repeats, device)
    diff = (outs["ours"].float() - outs["theirs"].float()).abs().max().item()
    if dname == "fp32":  # same weights, same inputs: the numbers must agree before speed counts
        assert diff < 1e-3, f"workload {w} fp32: ours and theirs differ by {diff:.2e}"
    mem = {} if args.no_memory else {k: peak_mb(k, w, dname, device, args.batch, impl) for k in fns}
    flops = model_flops(lengths, int((ids == MASK_ID).sum()) if w == "e" else 0)
    return dict(w=w, label=label, tok=sum(lengths), secs=secs, flops=flops, mem=mem, diff=diff)


def run_all(args, rows, ceilings):
    """Every (device, dtype) setup and workload asked for; rows are appended as they finish."""
    for device, dname, impl in setups(args.dtypes.split(",")):
        models = build_models("both", DTYPES[dname], device, impl)
        label = f"{device.type} {dname}" + (" (ours flash)" if impl == "flash_attention_2" else "")
        for w in args.workloads.split(","):  # the ceiling is re-measured between workloads; the best counts
            ceilings[label] = max(ceilings.get(label, 0.0), matmul_ceiling(DTYPES[dname], device))
            if w != "f" or device.type == "cuda":
                rows.append(run_workload(models, w, label, dname, device, impl, args))
        ceilings[label] = max(ceilings[label], matmul_ceiling(DTYPES[dname], device))
        del models
        gc.collect()


def print_tables(args, rows, ceilings, interrupted):
    """The markdown report: heading, the main table, and the fill-mask sparse-vs-full table."""
    print(f"Machine: {machine_line()}  \nCommand: `python bench.py {' '.join(sys.argv[1:])}`" + (" (interrupted: finished rows only)" if interrupted else "") + "  ")
    print("Matmul ceiling (best seen during the run): " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in ceilings.items()) + "\n")
    print(f"Batches: {args.batch} sequences for a, b, e, f; {max(1, args.batch // 2)} of 512 for c; right-padded. Tokens/s count real tokens; best of {args.repeats}.")
    print("MFU = model FLOP/s (bench.model_flops: real tokens, windowed local attention) / the matmul ceiling in that dtype.")
    print("Peak MB: extra memory one forward needs above the loaded weights and inputs, each in a fresh process.")
    print("max abs diff: ours vs theirs on the real tokens' last hidden state (e: the logits at the masks).\n")
    print("| workload | device, dtype | real tokens | ours tok/s | theirs tok/s | ours/theirs | ours MFU | theirs MFU | ours peak MB | theirs peak MB | max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s, m = r["secs"], r["mem"]
        mfu = {k: r["flops"] / t / ceilings[r["label"]] for k, t in s.items()}
        print(
            f"| {r['w']}: {WORKLOADS[r['w']][0]} | {r['label']} | {r['tok']} | {r['tok'] / s['ours']:,.0f} | {r['tok'] / s['theirs']:,.0f} | "
            f"**{s['theirs'] / s['ours']:.2f}x** | {mfu['ours']:.1%} | {mfu['theirs']:.1%} | {fmt(m.get('ours'), ',.0f')} | {fmt(m.get('theirs'), ',.0f')} | {r['diff']:.1e} |"
        )
    fill = [r for r in rows if r["w"] == "e"]
    if fill:
        print("\nFill-mask (e), ours two ways: sparse decoder (head + decoder on the masked rows only) vs full-vocabulary logits.\n")
        print("| device, dtype | sparse tok/s | full-logits tok/s | sparse/full | full/theirs | sparse peak MB | full peak MB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in fill:
            s, m = r["secs"], r["mem"]
            print(
                f"| {r['label']} | {r['tok'] / s['ours']:,.0f} | {r['tok'] / s['ours_full']:,.0f} | {s['ours_full'] / s['ours']:.2f}x | "
                f"{s['theirs'] / s['ours_full']:.2f}x | {fmt(m.get('ours'), ',.0f')} | {fmt(m.get('ours_full'), ',.0f')} |"
            )


def main():
    """Parses flags, then runs the child mode or the whole benchmark and prints the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="a,b,c,d,e,f", help="comma-separated subset of a,b,c,d,e,f (f runs on CUDA only)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per workload; the best counts")
    p.add_argument("--batch", type=int, default=16, help="sequences per batch for a, b, e, f (c uses half)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--child", choices=["ours", "theirs", "ours_full"], help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--ours-impl", default="sdpa", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps({"peak_mb": child_peak_mb(args)}))
        return
    rows, ceilings, interrupted = [], {}, False
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` too still prints finished rows
    try:
        run_all(args, rows, ceilings)
    except KeyboardInterrupt:  # a long run stopped early still reports what it finished
        interrupted = True
    print_tables(args, rows, ceilings, interrupted)


if __name__ == "__main__":
    main()
