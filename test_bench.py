"""Tests of bench.py, in the file's order: it builds its models with each library's own init, its flags (what a
device cannot run is said or refused, never dropped) and the 32K config docs/long-context.md shows. No benchmark
runs here.
"""

import importlib
from pathlib import Path

import pytest
import torch

import modernbert as mb
from conftest import HERE, needs_transformers

# ----------------------------------------------------------------------------------------------------
# Building the models: build_models uses each library's own init and changes nothing global


@pytest.mark.slow
@needs_transformers
def test_bench_builds_models_without_replacing_any_initialiser():
    import bench

    # (by its module: an earlier test may have left the package without the attribute that names it)
    theirs = importlib.import_module("transformers.initialization")
    torch_init, theirs_init = torch.nn.init.trunc_normal_, theirs.TORCH_INIT_FUNCTIONS.copy()
    bench.build_models("ours", torch.float32, torch.device("cpu"), "sdpa")
    assert torch.nn.init.trunc_normal_ is torch_init
    assert theirs_init == theirs.TORCH_INIT_FUNCTIONS


# ----------------------------------------------------------------------------------------------------
# The command line: pick_device, parse_args and the device defaults


@needs_transformers  # (bench.py imports it)
def test_bench_picks_the_devices_its_tables_cover(monkeypatch):
    """bench.pick_device is modernbert.pick_device on the devices the bench's tables cover: CUDA, else the CPU
    (never MPS, which modernbert.pick_device would pick)."""
    import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mps = torch.device("mps")
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: mps)
    assert mb.pick_device() == mps and bench.pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench.pick_device("auto") == torch.device("cuda")


@needs_transformers
def test_bench_says_what_it_skips_and_refuses_what_it_cannot_run(monkeypatch, capsys):
    import bench

    def parsed(*argv, cuda=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        args, device = bench.parse_args(list(argv))
        return args, device.type, capsys.readouterr().err

    args, device, err = parsed("--device", "cpu", "--workloads", "a,f")
    assert (device, args.workloads) == ("cpu", "a") and "workload f" in err and "skipped on cpu" in err, err
    args, device, err = parsed("--attn", "sdpa", "--workloads", "a,f", "--no-compile")  # docs/speed.md's GPU command
    assert (device, args.workloads, args.compiled) == ("cpu", "a", False)
    assert "no CUDA GPU here, so this is the CPU benchmark" in err and "skipped on cpu" in err, err
    assert "--compile/--no-compile applies to the other device: ignored on cpu" in err, err
    args, device, err = parsed()
    assert (device, args.workloads, args.dtypes, args.batch_size) == ("cpu", "a,b,c,d,e", "fp32,bf16", 16)
    args, device, err = parsed("--batch", "4", cuda=True)
    assert (device, args.workloads, args.batch_size, args.compiled) == ("cuda", "a,c,d,f", 512, True)
    assert err == "note: --batch applies to the other device: ignored on cuda\n", err
    for argv, message in [
        (("--device", "cuda"), "--device cuda: torch sees no CUDA GPU here"),
        (("--device", "cpu", "--workloads", "f"), "--workloads f runs on CUDA only: nothing left to run on cpu"),
        (("--workloads", "a,z"), "--workloads: unknown 'z'"),
        (("--dtypes", "fp16"), "--dtypes: unknown 'fp16'"),
        (("--build", "--train"), "--build and --train are separate benchmarks: run one at a time"),
        (("--train", "--dtypes", "fp32,bf16"), "--train times one dtype a run: give --dtypes fp32 or --dtypes bf16"),
        (("--ablations", "--rows", "0,9"), "--rows: numbers from 0 to 6, comma-separated, not '0,9'"),
        (("--ablations", "--seeds", "0,x"), "--ablations: --seeds are whole numbers, comma-separated"),
        (("--ablations", "--jobs", "0"), "--steps, --run-mlm-steps, --jobs and --threads at least 1"),
        (("--ablations", "--run-mlm-steps", "0"), "--steps, --run-mlm-steps, --jobs and --threads at least 1"),
        (("--ablations", "--recipe-flags=--mask-rate 2"), "--recipe-flags: --mask-rate must be between 0 and 1"),
    ]:
        with pytest.raises(SystemExit) as e:
            parsed(*argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    assert parsed("--attn", "flex_attention")[0].attn == "flex_attention"
    args, device, err = parsed("--long-context", cuda=True)  # memory as the CPU's RSS: fp32 unless asked
    assert (device, args.dtypes, args.context_lengths) == ("cpu", "fp32", "8192,16384,32768"), err
    with pytest.raises(SystemExit):
        parsed("--long-context", "--device", "cuda", cuda=True)
    assert "--long-context measures a CPU forward's memory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parsed("--help")
    usage = " ".join(capsys.readouterr().out.split())  # argparse's wrapping undone
    assert "see above" not in usage and "the best counts (default 3)" in usage, usage


# ----------------------------------------------------------------------------------------------------
# --long-context: docs/long-context.md's 32K config is the one benchmarked


@needs_transformers  # (bench.py imports it)
def test_docs_32k_config_is_the_one_benchmarked():
    """docs/long-context.md's 32K snippet, run as written, makes the config whose numbers it shows (bench.py
    --long-context)."""
    import bench

    section = Path(HERE, "docs", "long-context.md").read_text().split("## The 32K config")[1].split("\n## ")[0]
    namespace = {"modernbert": mb}
    exec(section.split("```python\n")[1].split("```")[0], namespace)
    assert namespace["config"] == mb.ModernBertConfig(**bench.LONG_CONTEXT)


# ----------------------------------------------------------------------------------------------------
# --ablations: each row switches one piece of train.py's recipe; the run_mlm way is the reference row


@needs_transformers  # (bench.py imports it)
def test_each_ablation_row_switches_one_piece_of_the_recipe():
    """The first row is train.py's default run; every other row changes exactly one setting, away from its
    default, through train.py's own command line."""
    import bench
    import train

    rows = list(bench.ABLATIONS.values())
    assert rows[0] == []
    switched, plain = [], vars(train.parse_args([]))
    for flags in rows[1:]:
        given = {k: v for k, v in vars(train.parse_args(flags)).items() if v != plain[k]}
        assert len(given) == 1, (flags, given)
        ((name, value),) = given.items()
        assert value != train.DEFAULTS[name], flags
        switched.append(name)
    assert switched == ["packing", "mask_rate", "sparse_prediction", "optimizer", "schedule"]


@pytest.mark.slow
@needs_transformers
def test_ablations_train_each_row_and_write_the_table_the_file_and_the_picture(tmp_path):
    """A tiny --ablations run: packing off and the run_mlm way on a small text; the table has each row, the
    results file every run (packing off sees fewer real tokens than the steps' positions), and tools/plot_run.py
    draws it."""
    import json
    import subprocess
    import sys

    words = "the a list of values file name returns given number string object each default when".split()
    gen = torch.Generator().manual_seed(0)
    documents = [
        " ".join(words[i] for i in torch.randint(len(words), (int(n),), generator=gen).tolist())
        for n in torch.randint(20, 120, (300,), generator=gen)
    ]
    (tmp_path / "text.txt").write_text("\n\n".join(documents))
    results = tmp_path / "ablations.json"
    command = [sys.executable, "bench.py", "--ablations", "--steps", "2", "--run-mlm-steps", "3", "--seeds", "3"]
    command += ["--rows", "0,1,6", "--recipe-flags=--mask-rate 0.2"]
    command += [
        "--data",
        str(tmp_path / "text.txt"),
        "--jobs",
        "2",
        "--threads",
        "1",
        "--ablations-json",
        str(results),
    ]
    run = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    import bench
    import train

    table = [line for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [*[*bench.ABLATIONS][:2], bench.RUN_MLM]
    assert [line.split(" | ")[0][2:] for line in table] == names, run.stdout
    saved = json.loads(results.read_text())["results"]
    assert sorted((r["row"], r["seed"]) for r in saved) == sorted((n, 3) for n in names)
    assert all(0 <= r["accuracy"] <= 1 and r["step_s"] > 0 for r in saved)
    assert [r["steps"] for r in saved] == [2, 2, 3]  # --run-mlm-steps: the run_mlm way's own
    assert saved[0]["recipe_flags"] == ["--mask-rate", "0.2"]
    tokens, batch = {r["row"]: r["tokens"] for r in saved}, bench.ABLATION_BATCH_TOKENS
    assert batch != train.DEFAULTS["batch_tokens"]  # so the rows below show the ablation's batch, not the default's
    assert batch < tokens[names[0]] <= 2 * batch, tokens  # packed: 2 batches nearly full
    assert tokens[names[1]] < 2 * batch and tokens[names[2]] == 3 * batch, tokens  # packing off: padding in each row
    pytest.importorskip("matplotlib", reason="matplotlib (tools/ only) is not installed: requirements-oracle.txt")
    plot = subprocess.run(
        [sys.executable, "tools/plot_run.py", "--ablations", str(results), "--out", str(tmp_path / "a.png")],
        cwd=HERE,
        capture_output=True,
        text=True,
    )
    assert plot.returncode == 0 and (tmp_path / "a.png").stat().st_size > 0, plot.stderr
