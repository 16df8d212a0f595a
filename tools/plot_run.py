"""The pictures in README.md and docs/: a training run's curves, and the attention of one packed batch.

    python tools/plot_run.py trained-modernbert                 # the run's curves -> trained-modernbert/curves.png
    python tools/plot_run.py my-bert --out my-bert.png          # any run folder of train.py, anywhere
    python tools/plot_run.py --attention docs/images/attention.png
    python tools/plot_run.py --ablations ablations.json --out docs/images/ablations.png   # bench.py --ablations

The curves come from the run folder's trainer_state.json (its log_history, as transformers' Trainer writes it):
held-out loss and masked-token accuracy at each evaluation, the training loss between them, and the accuracy of
always answering the most frequent token where the run recorded it. The ablations picture draws the file that
`python bench.py --ablations` writes: each row's held-out accuracy, a dot a seed, and their mean. The attention
picture is computed by modernbert.py itself: its packing of three documents into one stream, the half-window each
layer type gets, and its reference kernel, so it shows what the model does rather than a drawing of it.

matplotlib is needed here only (requirements-oracle.txt installs it); modernbert.py, load.py, embed.py and
train.py never import it or this file.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENT_LENGTHS = (300, 190, 140)  # the packed batch drawn: three documents of different lengths
BASELINE_KEY = "eval_most_frequent_token_accuracy"  # a log_history entry's key, where train.py records it
LOSS, ACCURACY, BASELINE, TRAINING = "#1f4e79", "#c0392b", "#7f7f7f", "#9dc3e6"


def attention_masks(lengths=DOCUMENT_LENGTHS):
    """{"global": (T, T), "local": (T, T)} booleans, query by key, for the documents packed back to back into one
    stream of T tokens, as ModernBERT-base's layers 0 (global) and 1 (local) attend. Computed by modernbert.py's
    own code: pack_inputs (the door every forward goes through), the half-window its attention module takes, and
    eager_attention (the reference kernel) with equal scores and the identity as values, so that each output row is
    the query's attention weights: 1/n on the n keys it may see, 0 on the others."""
    sys.path.insert(0, ROOT)
    import torch

    import modernbert as mb

    config = mb.ModernBertConfig()
    T = sum(lengths)
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    packing = mb.pack_inputs(config, torch.zeros(1, T, dtype=torch.long), None, None, {"cu_seqlens": cu_seqlens})
    scores = torch.zeros(T, 1, T)  # (T, H, D), H = 1: every allowed key scores the same
    values = torch.eye(T)[:, None, :]  # (T, H, D): value j is the one-hot of key j
    masks = {}
    for name, layer_id in (("global", 0), ("local", 1)):
        half_window = mb.ModernBertAttention(config, layer_id).half_window
        weights = mb.eager_attention(scores, scores, values, packing, half_window)[:, 0]  # (T, T)
        masks[name] = weights > 0
    return masks, config.half_window


def attention_figure(lengths=DOCUMENT_LENGTHS):
    """Two panels, global and local layer: which key (column) each query (row) of the packed stream sees."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    masks, half_window = attention_masks(lengths)
    T, edges = sum(lengths), [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 6), layout="constrained")
    titles = {
        "global": "global layer (0, 3, 6, ...):\neach token sees its whole document",
        "local": f"local layer (1, 2, 4, 5, ...):\neach token sees ±{half_window} tokens of its document",
    }
    for ax, (name, mask) in zip(axes, masks.items()):
        ax.imshow(mask.numpy(), cmap=ListedColormap(["#f4f4f4", LOSS]), interpolation="nearest", extent=(0, T, T, 0))
        for edge in edges[1:-1]:
            ax.axhline(edge, color="#999999", lw=0.6)
            ax.axvline(edge, color="#999999", lw=0.6)
        for i, (start, n) in enumerate(zip(edges, lengths)):
            if name == "global":  # the local panel has the same documents in the same places
                ax.text(
                    start + n / 2,
                    start + n / 2,
                    f"document {i + 1}\n{n} tokens",
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white",
                )
        ax.set_title(titles[name], fontsize=11)
        ax.set_xlabel("key: position in the packed stream")
        ax.set_ylabel("query: position in the packed stream")
        ax.set_xticks(edges)
        ax.set_yticks(edges)
    fig.suptitle(
        f"One packed batch: {len(lengths)} documents back to back, {T} tokens, no padding. Blue: the keys each query "
        "sees.\nNo token sees another document (grey lines: where one ends and the next begins).",
        fontsize=11,
    )
    return fig


def read_state(run):
    """The run folder's trainer_state.json, or a one-line error."""
    path = os.path.join(run, "trainer_state.json")
    if not os.path.isfile(path):
        raise ValueError(f"{run!r} has no trainer_state.json: give the folder a train.py run wrote (its --out).")
    with open(path) as f:
        return json.load(f)


def training_figure(state, title):
    """Held-out loss (with the training loss) and held-out masked-token accuracy against steps, and the most
    frequent token's accuracy where the run recorded it."""
    import matplotlib.pyplot as plt

    history = state["log_history"]
    evals = [e for e in history if "eval_loss" in e]
    train = [e for e in history if "loss" in e]
    baseline = next((e[BASELINE_KEY] for e in reversed(history) if BASELINE_KEY in e), None)
    if not evals:
        raise ValueError("trainer_state.json has no evaluation yet (no eval_loss in its log_history).")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    steps = [e["step"] for e in evals]
    left.plot([e["step"] for e in train], [e["loss"] for e in train], color=TRAINING, label="training loss")
    left.plot(steps, [e["eval_loss"] for e in evals], "o-", color=LOSS, ms=4, label="held-out loss")
    left.set_ylabel("masked-token loss (cross-entropy)")
    accuracy = [e["eval_accuracy"] for e in evals]
    right.plot(steps, accuracy, "o-", color=ACCURACY, ms=4, label=f"held-out accuracy (last {accuracy[-1]:.3f})")
    if baseline is not None:
        right.axhline(baseline, ls="--", color=BASELINE, label=f"always the most frequent token ({baseline:.3f})")
    right.set_ylabel("masked-token accuracy")
    right.set_ylim(bottom=0)
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    fig.suptitle(f"{title}: {state['global_step']:,} steps, {state.get('num_input_tokens_seen', 0):,} tokens seen")
    return fig, baseline


def read_ablations(path):
    """bench.py --ablations' results file, or a one-line error."""
    try:
        with open(path) as f:
            results = json.load(f)["results"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path!r} is not the file `python bench.py --ablations` writes ({e}).") from e
    if not results:
        raise ValueError(f"{path!r} holds no results.")
    return results


def ablations_figure(results):
    """Held-out accuracy of each row of bench.py --ablations: a dot per seed and a bar at their mean, the recipe
    on top, a dashed line at its mean."""
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(r["row"] for r in results))
    steps = results[0]["steps"]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.2), layout="constrained")
    means = []
    for y, row in enumerate(rows):
        accuracy = [r["accuracy"] for r in results if r["row"] == row]
        means.append(sum(accuracy) / len(accuracy))
        ax.barh(y, means[-1], color=TRAINING if y else LOSS, height=0.6)
        ax.plot(accuracy, [y] * len(accuracy), "o", color=ACCURACY, ms=4)
        ax.text(max(accuracy), y, f"   {means[-1]:.3f}", va="center")
    ax.axvline(means[0], ls="--", color=BASELINE)
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlim(0, max(r["accuracy"] for r in results) * 1.15)
    ax.set_xlabel("held-out masked-token accuracy (15% masked); a dot a seed, the bar their mean")
    seeds = len({r["seed"] for r in results})
    ax.set_title(f"Each piece of the recipe switched off: {steps:,} steps each, {seeds} seed{'s' * (seeds > 1)}")
    ax.grid(axis="x", alpha=0.3)
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Draw a train.py run's curves, bench.py's ablations, or the attention of a packed batch."
    )
    parser.add_argument("run", nargs="?", help="a run folder (train.py's --out) holding trainer_state.json")
    parser.add_argument("--out", help="the PNG to write (default: RUN/curves.png)")
    parser.add_argument("--attention", metavar="PNG", help="draw the attention of a packed batch into PNG instead")
    parser.add_argument("--ablations", metavar="JSON", help="draw bench.py --ablations' results instead (with --out)")
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.run, args.attention, args.ablations)) != 1:
        parser.error("give a run folder, --attention PNG or --ablations JSON (one of them)")
    if args.ablations and not args.out:
        parser.error("--ablations JSON needs --out PNG")
    try:
        import matplotlib

        matplotlib.use("Agg")
        if args.attention:
            figure, out = attention_figure(), args.attention
        elif args.ablations:
            figure, out = ablations_figure(read_ablations(args.ablations)), args.out
        else:
            figure, baseline = training_figure(read_state(args.run), os.path.basename(os.path.abspath(args.run)))
            out = args.out or os.path.join(args.run, "curves.png")
            if baseline is None:
                print(f"note: no {BASELINE_KEY} in trainer_state.json: drawn without the most-frequent-token line")
        figure.savefig(out, dpi=100)
    except ImportError as e:
        print(
            f"error: {e.name} is not installed: pip install -r requirements-oracle.txt (or pip install {e.name})",
            file=sys.stderr,
        )
        return 2
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
