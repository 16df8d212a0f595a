"""Tests of the documentation: every snippet in README.md and docs/*.md runs as printed, README stays a front door
(at most 300 lines, its file map true), the docs name no issue numbers, and tools/plot_run.py draws its pictures.

Fenced blocks marked ```python, ```bash or ```sh are code; ```text and unmarked blocks are output, never run. A code
block runs offline on a fresh clone, with requirements.txt installed and ../shared beside it, unless its first line
says what else it needs, `# needs: ` and one or more of NEEDS (below), comma-separated:

    # needs: hub, oracle
    from transformers import AutoTokenizer

Each block that runs is run in a copy of the checkout (tracked and untracked files, not ignored ones) with ../shared
beside it as the working directory, offline (HF_HUB_OFFLINE=1), python blocks with `python -c`, bash blocks with
`bash -e -c`; `python` is this interpreter. It must exit 0. A block marked `above` runs after the block before it (and
that one's `above` chain), in the same folder, with their needs joined.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PAGES = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]
SHARED_DATA = Path(os.environ.get("MODERNBERT_SHARED_DATA", HERE.parent / "shared" / "data"))
HAS_TOKENIZER = (SHARED_DATA / "modernbert-base" / "tokenizer.json").is_file()
README_LINES = 300

NEEDS = {
    "hub": "downloads from the Hugging Face hub: run with `pytest -m hub` or MODERNBERT_HUB=1",
    "gpu": "needs a CUDA GPU",
    "oracle": "needs requirements-oracle.txt installed",
    "minutes": "takes a minute or more (a training run, a benchmark, the test suite): run it yourself",
    "internet": "installs or downloads from the internet",
    "your-data": "needs files of your own that it names",
    "above": "continues the block above it",
}
ORACLE_MODULES = ("transformers", "sentence_transformers", "optimi", "accelerate", "onnxscript", "matplotlib")
CODE, OUTPUT = ("python", "bash", "sh"), ("text", "")
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```[ \t]*$", re.S | re.M)
NEEDS_LINE = re.compile(r"#\s*needs:\s*(.+)")
HUB_IDS = re.compile(r"\b(answerdotai|nomic-ai|Alibaba-NLP|jhu-clsp|lightonai)/[\w.-]+")


class Block:
    def __init__(self, page, line, lang, code):
        self.page, self.line, self.lang, self.code = page, line, lang, code
        first = code.splitlines()[0] if code.strip() else ""
        found = NEEDS_LINE.fullmatch(first.strip())
        self.needs = [n.strip() for n in found.group(1).split(",")] if found else []

    @property
    def where(self):
        return f"{self.page.relative_to(HERE)}:{self.line}"


def page_blocks(page):
    text = page.read_text()
    return [Block(page, text.count("\n", 0, m.start()) + 1, *m.groups()) for m in FENCE.finditer(text)]


def chains():
    """Each code block with the blocks it continues (`above`), as one list; a block that a later one continues
    runs inside that one's chain only."""
    out = []
    for page in PAGES:
        code = [b for b in page_blocks(page) if b.lang in CODE]
        for i, block in enumerate(code):
            if i + 1 < len(code) and "above" in code[i + 1].needs:
                continue
            start = i
            while "above" in code[start].needs and start > 0:
                start -= 1
            out.append(code[start : i + 1])
    return out


def needs_of(chain):
    return {n for b in chain for n in b.needs} - {"above"}


def chain_param(chain):
    needs = needs_of(chain)
    marks = [pytest.mark.slow] + [getattr(pytest.mark, n) for n in ("hub", "gpu") if n in needs]
    return pytest.param(chain, marks=marks, id=chain[-1].where)


# ----------------------------------------------------------------------------------------------------
# What the pages say, checked without running anything


def test_readme_is_at_most_300_lines():
    lines = len((HERE / "README.md").read_text().splitlines())
    assert lines <= README_LINES, f"README.md has {lines} lines; the rest belongs in docs/ (at most {README_LINES})"


ISSUE_REFERENCES = [
    re.compile(r"\bissues?\s*(#|no\.?\s*|number\s*)?\d+", re.I),  # "issue 26", "Issue #26", "issues 18"
    re.compile(r"\(\s*issue", re.I),  # "(issue ...)"
    re.compile(r"(?<![\w&/#])#\d+\b"),  # "#26": GitHub's issue and pull-request references
    re.compile(r"\b(PR|pull request)\s*#?\d+", re.I),
]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(HERE)))
def test_no_issue_numbers(page):
    """The documentation speaks of the project, not of how it was built: no issue or pull-request numbers."""
    for n, line in enumerate(page.read_text().splitlines(), 1):
        for pattern in ISSUE_REFERENCES:
            assert not pattern.search(line), f"{page.relative_to(HERE)}:{n} names an issue: {line.strip()!r}"


def test_the_issue_number_check_can_fail():
    caught = ["see issue 26", "Issue #7 removed both", "(issue 18)", "fixed in #12", "PR 40"]
    passed = ["a `# needs: hub` line", "[MASK] 1 of 1", "step 10 of 768", "any issue with the hub"]
    assert all(any(p.search(s) for p in ISSUE_REFERENCES) for s in caught)
    assert not any(p.search(s) for p in ISSUE_REFERENCES for s in passed)


def test_every_block_is_code_or_output_and_says_what_it_needs():
    """Every fence is a language this test runs or output it leaves alone; every `# needs:` word is one of NEEDS;
    an `above` block has a block above it; a block that runs offline passes no hub id."""
    for page in PAGES:
        code = []
        for block in page_blocks(page):
            assert block.lang in CODE + OUTPUT, f"{block.where}: ```{block.lang} is neither code {CODE} nor output"
            if block.lang in OUTPUT:
                assert not block.needs, f"{block.where}: an output block needs nothing (is it code? ```python)"
                continue
            unknown = set(block.needs) - set(NEEDS)
            assert not unknown, f"{block.where}: `# needs:` {sorted(unknown)}; known: {', '.join(NEEDS)}"
            assert "above" not in block.needs or code, f"{block.where}: `above`, but no code block above it"
            code.append(block)
    for chain in chains():
        hub_ids = HUB_IDS.findall("\n".join(b.code for b in chain))
        assert "hub" in needs_of(chain) or not hub_ids, f"{chain[-1].where}: hub ids without `# needs: hub`"


LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(HERE)))
def test_links_and_pictures_are_there(page):
    """Every relative link goes to a file of the checkout, and every picture is a PNG under 150 KB."""
    for target, _ in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path = (page.parent / target).resolve()
        assert path.exists(), f"{page.relative_to(HERE)} links to {target}, which is not there"
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{target} is not a PNG"
            assert path.stat().st_size < 150_000, f"{target}: {path.stat().st_size:,} bytes; keep pictures small"


FILE_ROW = re.compile(r"^\| `([^`]+)` \| ([\d,]+) \|", re.M)


def test_readme_file_map_is_true():
    """README's file map: each file it names is there, with its line count within 10%; every Python file at the top
    of the checkout and in tools/ is on it."""
    rows = FILE_ROW.findall((HERE / "README.md").read_text())
    assert rows, "README.md has a file map: | `file` | lines | what it is for |"
    for name, shown in rows:
        assert (HERE / name).is_file(), f"README's file map names {name}, which is not there"
        lines, shown = len((HERE / name).read_text().splitlines()), int(shown.replace(",", ""))
        assert abs(lines - shown) <= max(0.1 * lines, 10), f"README's file map: {name} has {lines} lines, not {shown}"
    on_map = {name for name, _ in rows}
    for path in [*HERE.glob("*.py"), *HERE.glob("tools/*.py")]:
        assert str(path.relative_to(HERE)) in on_map, f"{path.relative_to(HERE)} is missing from README's file map"


# ----------------------------------------------------------------------------------------------------
# Every code block, run as printed


def hub_wanted(request):
    mark_expression = request.config.getoption("markexpr") or ""
    return os.environ.get("MODERNBERT_HUB") == "1" or re.search(r"(?<!not )\bhub\b", mark_expression)


def checkout_copy(folder):
    """A copy of the checkout as a fresh clone has it (tracked and untracked files, not the ignored ones: no
    virtual environment, no trained-modernbert), with ../shared beside it; returns the copy's root."""
    root = folder / "checkout"
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=HERE,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [Path(name) for name in listed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but hidden folders and caches
        files = [
            p.relative_to(HERE)
            for p in HERE.rglob("*")
            if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in p.parts)
        ]
    for name in files:
        if (HERE / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(HERE / name, root / name)
    (folder / "shared").mkdir()
    if SHARED_DATA.is_dir():
        (folder / "shared" / "data").symlink_to(SHARED_DATA, target_is_directory=True)
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # this interpreter, venv and all
    (bin_dir / "python").chmod(0o755)
    return root, bin_dir


def skip_reason(needs, request):
    for need in ("minutes", "internet", "your-data"):
        if need in needs:
            return NEEDS[need]
    if "gpu" in needs:
        import torch

        if not torch.cuda.is_available():
            return NEEDS["gpu"]
    if "hub" in needs and not hub_wanted(request):
        return NEEDS["hub"]
    missing = [m for m in ORACLE_MODULES if importlib.util.find_spec(m) is None]
    if "oracle" in needs and missing:
        return f"{NEEDS['oracle']} ({', '.join(missing)} missing)"
    return None


@pytest.mark.parametrize("chain", [chain_param(c) for c in chains()])
def test_block_runs_as_printed(chain, tmp_path, request):
    needs = needs_of(chain)
    reason = skip_reason(needs, request)
    if reason:
        pytest.skip(reason)
    if any("../shared" in b.code for b in chain) and not HAS_TOKENIZER:
        where = SHARED_DATA / "modernbert-base"
        pytest.skip(f"needs the real tokenizer in {where} (../shared beside the checkout, or MODERNBERT_SHARED_DATA)")
    root, bin_dir = checkout_copy(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "MPLBACKEND": "Agg"}
    if "hub" not in needs:
        env["HF_HUB_OFFLINE"] = "1"
    for block in chain:
        command = [sys.executable, "-c", block.code] if block.lang == "python" else ["bash", "-e", "-c", block.code]
        done = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600
        )
        if done.returncode and "hub" in needs and "the Hugging Face hub could not be reached" in done.stderr:
            pytest.skip(f"{block.where}: the Hugging Face hub could not be reached")  # as test_modernbert's hub tests
        assert done.returncode == 0, (
            f"{block.where}: exit status {done.returncode}\n--- the block ---\n{block.code}"
            f"--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-3000:]}"
        )


# ----------------------------------------------------------------------------------------------------
# tools/plot_run.py: both pictures, from a tiny run


def plot_run_module():
    spec = importlib.util.spec_from_file_location("plot_run", HERE / "tools" / "plot_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A train.py run folder of a few steps of a tiny model, two evaluations."""
    import train

    folder = tmp_path_factory.mktemp("plot")
    docs = [d for _, d in zip(range(200), train.stdlib_docstrings())]
    (folder / "docs.txt").write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs))
    args = ["--data", str(folder / "docs.txt"), "--out", str(folder / "run"), "--steps", "4", "--evals", "2"]
    args += ["--layers", "1", "--hidden", "32", "--heads", "2", "--intermediate", "48", "--vocab", "400"]
    args += ["--max-len", "64", "--batch-tokens", "256", "--log-every", "1", "--samples", "A [MASK]."]
    assert train.main(args) == 0
    return folder / "run"


def run_plot(*args, cwd):
    return subprocess.run(
        [sys.executable, str(HERE / "tools" / "plot_run.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )


@pytest.mark.slow
def test_plot_run_draws_both_pictures(tiny_run, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (tools/ only) is not installed: requirements-oracle.txt")
    done = run_plot(tiny_run, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.endswith(f"wrote {tiny_run / 'curves.png'}\n"), done.stderr
    done = run_plot("--attention", "attention.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for png in (tiny_run / "curves.png", tmp_path / "attention.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 150_000
    done = run_plot(tmp_path, cwd=tmp_path)  # a folder that is not a run
    assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1


@pytest.mark.slow
def test_plot_run_curves_are_the_runs(tiny_run):
    """The curves are trainer_state.json's evaluations and training losses, and the most-frequent-token line where
    the run recorded it."""
    pytest.importorskip("matplotlib", reason="matplotlib (tools/ only) is not installed: requirements-oracle.txt")
    import json

    plot_run = plot_run_module()
    state = json.loads((tiny_run / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    assert len(evals) == 2
    state["log_history"][-1].setdefault(plot_run.BASELINE_KEY, 0.061)
    figure, baseline = plot_run.training_figure(state, "tiny")
    left, right = figure.axes
    lines = {line.get_label(): line for line in left.lines + right.lines}
    assert list(lines["held-out loss"].get_ydata()) == [e["eval_loss"] for e in evals]
    assert list(lines["training loss"].get_xdata()) == [e["step"] for e in state["log_history"] if "loss" in e]
    accuracy = next(line for label, line in lines.items() if label.startswith("held-out accuracy"))
    assert list(accuracy.get_ydata()) == [e["eval_accuracy"] for e in evals]
    drawn = next(line for label, line in lines.items() if label.startswith("always the most frequent token"))
    assert list(drawn.get_ydata()) == [baseline] * 2 and baseline == state["log_history"][-1][plot_run.BASELINE_KEY]


@pytest.mark.slow
def test_plot_run_attention_is_the_models():
    """The attention picture's masks: a query sees exactly the keys of its own document on a global layer, and
    those within the half-window on a local one (what modernbert.py computed, checked against the rule)."""
    import torch

    masks, half_window = plot_run_module().attention_masks((40, 25, 70))
    document = torch.repeat_interleave(torch.arange(3), torch.tensor([40, 25, 70]))
    position = torch.cat([torch.arange(n) for n in (40, 25, 70)])
    same_document = document[:, None] == document[None, :]
    near = (position[:, None] - position[None, :]).abs() <= half_window
    assert half_window == 64
    assert torch.equal(masks["global"], same_document)
    assert torch.equal(masks["local"], same_document & near) and not torch.equal(masks["local"], masks["global"])


def test_the_ablation_table_is_the_results_file():
    """docs/training.md's ablation table is docs/ablations.json, the file bench.py --ablations wrote and the
    picture is drawn from: each row's mean and spread over the seeds, tokens seen and seconds a step."""
    import json
    import statistics

    saved = json.loads((HERE / "docs" / "ablations.json").read_text())["results"]
    section = (HERE / "docs" / "training.md").read_text().split("## What each piece buys")[1].split("\n## ")[0]
    table = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")][1:]
    rows = list(dict.fromkeys(r["row"] for r in saved))
    assert [cells[0].strip().replace("`", "") for cells in table] == rows
    for cells, row in zip(table, rows):
        accuracy = [r["accuracy"] for r in saved if r["row"] == row]
        mean, spread = statistics.mean(accuracy), statistics.stdev(accuracy)
        tokens = statistics.mean(r["tokens"] for r in saved if r["row"] == row)
        seconds = statistics.mean(r["step_s"] for r in saved if r["row"] == row)
        expected = [f"{mean:.3f} ± {spread:.3f}", f"{tokens:,.0f}", f"{seconds:.2f}"]
        assert [cells[1].strip(), cells[3].strip(), cells[4].strip()] == expected, row
    assert "240 steps" in section and {r["steps"] for r in saved} == {240} and len(saved) == 3 * len(rows)
