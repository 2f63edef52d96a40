"""The docs as a newcomer reads them: README is an entry page, the docs speak of the software only, and every command
they quote exists with every flag it is quoted with (its --help, in this process), so a renamed command or flag
fails here. What the commands do is tested where each lives; the 8B page runs whole in tests/test_rehearsal.py."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import runpy
import shlex
import sys
import tomllib
from functools import lru_cache

import pytest

from .conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Programs the docs may quote that are not ours: shell, package managers, SLURM and Ray clients, downloads.
FOREIGN = {"export", "source", "cd", "ls", "cat", "tail", "head", "git", "pip", "huggingface-cli", "wget", "sinfo",
           "squeue", "scancel", "scontrol", "ray", "wandb", "nvidia-smi", "mkdir", "tensorboard", "echo", "srun",
           "apt-get", "du", "watch", "bash"}


def quoted_commands() -> list[tuple[str, str]]:
    """(page, command) for every command line of every ```bash block of README and docs."""
    found = []
    for page in PAGES:
        for body in re.findall(r"```bash\n(.*?)```", page.read_text(), re.DOTALL):
            for line in body.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if not line or line.startswith("#"):
                    continue
                for part in re.split(r"\s+(?:&&|\|)\s+|;\s+", line):
                    if part:
                        found.append((str(page.relative_to(ROOT)), part))
    return found


def _words(command: str) -> list[str]:
    words = shlex.split(command.replace("$(", "(").replace("${", "{"))
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value before the program
        words.pop(0)
    return words


@lru_cache(maxsize=None)
def _entry_points() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _help(call, argv: list[str]) -> str:
    out = io.StringIO()
    saved = sys.argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            try:
                call(argv)
            except SystemExit as exc:
                assert exc.code in (0, None), f"{argv}: exit {exc.code}"
    finally:
        sys.argv = saved
    return out.getvalue()


@lru_cache(maxsize=None)
def help_text(kind: str, target: str, sub: str = "") -> str:
    argv = [sub, "--help"] if sub else ["--help"]
    if kind == "script":
        module, function = _entry_points()[target].split(":")
        return _help(getattr(importlib.import_module(module), function), argv)
    if kind == "module":
        module = importlib.import_module(target)
        if not hasattr(module, "main"):  # a package run with -m: its __main__
            module = importlib.import_module(target + ".__main__")
        return _help(module.main, argv)

    def run_path(args):
        sys.argv = [target, *args]
        runpy.run_path(str(ROOT / target), run_name="__main__")

    return _help(run_path, argv)


def _flags(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if w.startswith("--")]


def check(command: str) -> None:
    words = _words(command)
    program = words[0]
    if program in FOREIGN or (program.startswith("python") and words[1:3] == ["-m", "venv"]):
        return
    if program in _entry_points():
        sub = words[1] if program == "perceptio-vqvae" else ""
        text = help_text("script", program, sub)
        args = words[2:] if sub else words[1:]
    elif program in ("python", "python3", "torchrun") and "-m" in words:
        module = words[words.index("-m") + 1]
        if module in ("pytest", "torch.distributed.run", "pip"):
            return
        rest = words[words.index("-m") + 2:]
        sub = rest[0] if rest and not rest[0].startswith("-") and module.endswith("vqvae") else ""
        text = help_text("module", module, sub)
        args = rest[1:] if sub else rest
    elif program in ("python", "python3") and words[1].startswith("tools/"):
        text, args = help_text("path", words[1]), words[2:]
    elif program == "sbatch":
        assert (ROOT / words[-1]).is_file(), f"{command}: no script {words[-1]}"
        return
    elif program in ("./run_tests.sh", "./run_demo.sh", "tools/local_slurm.sh"):
        assert (ROOT / program).is_file(), command
        if program == "./run_demo.sh":
            text, args = help_text("script", "perceptio-demo"), words[1:]
        elif program == "tools/local_slurm.sh":
            text, args = (ROOT / program).read_text(), words[1:]
            assert words[1] in text, command
        else:
            return
    else:
        raise AssertionError(f"{command!r}: a program the docs test does not know (ours? add it; foreign? FOREIGN)")
    missing = [f for f in _flags(args) if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    assert not missing, f"{command!r}: {missing} not in its --help"


@pytest.mark.parametrize("page,command", quoted_commands(), ids=lambda v: v if len(v) < 60 else v[:57] + "...")
def test_every_quoted_command_exists_with_its_flags(page, command):
    check(command)


def test_a_renamed_flag_would_fail():
    with pytest.raises(AssertionError, match="--nproc-per-nod"):
        check("perceptio-train --nproc-per-nod 2 --recipe tiny_cpu")
    with pytest.raises(AssertionError, match="no script"):
        check("sbatch slurm/train_7b.sh")


def test_readme_is_an_entry_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).exists(), link
    assert "never run" in readme.lower()[:2500]  # said plainly, near the top


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_speak_of_the_software_only(page):
    text = page.read_text()
    words = re.findall(r"\b(?:issue \d+|issue-\d+|this session|sessions? so far|not lent)\b", text, re.I)
    words += re.findall(r"\bDESIGN\.md\b", text)
    assert not words, words
