"""Held-out masked-token accuracy of train.py's runs, each scored on the same masks, to compare runs.

    python tools/score_runs.py trained-modernbert other-run            # 8 mask draws each, their mean
    python tools/score_runs.py run-a run-b --draws 1 --batch-tokens 2048 --seed 0

A run scores itself once at its end, with masks drawn from its own --seed and grouped by its own --batch-tokens,
so two runs that differ in either are scored on different masks, and on a held-out set of a few thousand masked
tokens the draw alone moves the accuracy by about a hundredth. Here every run is scored on the same draws: draw k
masks the held-out set as a run with --seed k and these --batch-tokens would (draw s with the run's own seed and
batch tokens is the number the run printed), and the mean over the draws is the run's score. Each run's held-out
documents are its own data's (read as train.py reads --data) and its own tokenizer cuts them.

Needs torch and tokenizers (train.py's needs); never transformers.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import load  # noqa: E402
import modernbert as mb  # noqa: E402
import train  # noqa: E402


def score(folder, draws, batch_tokens):
    """The run's held-out accuracy at each draw (a list), on CPU in fp32."""
    checkpoint = train.get_last_checkpoint(folder)
    if checkpoint is None:
        raise ValueError(f"{folder} holds no checkpoint-<step>/ folder: give a run folder that train.py wrote")
    with open(os.path.join(checkpoint, "training_args.json")) as f:
        args = json.load(f)
    tokenizer = load.load_tokenizer(folder)
    tokenizer.no_padding()
    vocab = train.read_vocab(tokenizer)
    held_docs = train.split_held_out(train.read_documents(args.get("data")))[1]
    pieces = train.tokenize(tokenizer, vocab, held_docs, args["max_len"])
    train.check_budget(max(map(len, pieces)), batch_tokens)
    model = mb.ModernBertForMaskedLM.from_pretrained(folder)
    accuracies = []
    for k in draws:
        settings = {**train.DEFAULTS, "seed": k, "batch_tokens": batch_tokens, "max_len": args["max_len"]}
        batches = train.held_out_batches(pieces, settings, vocab)
        accuracies.append(train.evaluate(model, batches, train.mixed_precision(torch.device("cpu"), None))[1])
    return accuracies


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="train.py's output folders")
    p.add_argument("--draws", type=int, default=8, help="mask draws, seeds --seed to --seed + N - 1 (default 8)")
    p.add_argument("--seed", type=int, default=0, help="the first draw's seed (default 0)")
    p.add_argument("--batch-tokens", type=int, default=2048, help="tokens per held-out batch (default 2048)")
    args = p.parse_args(argv)
    if args.draws < 1 or args.batch_tokens < 3:
        p.error("--draws is at least 1 and --batch-tokens at least 3")
    draws = range(args.seed, args.seed + args.draws)
    print(f"held-out accuracy, masks of seeds {draws[0]} to {draws[-1]} in batches of {args.batch_tokens:,} tokens")
    for folder in args.runs:
        try:
            accuracies = score(folder, draws, args.batch_tokens)
        except (OSError, ValueError) as e:
            p.error(str(e))
        each = " ".join(f"{a:.4f}" for a in accuracies)
        print(f"{folder}\t{sum(accuracies) / len(accuracies):.4f}\t({each})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
