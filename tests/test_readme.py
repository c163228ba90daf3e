"""The README is the user's door: what it shows must work as written.

- Its "Python API" block (the one fenced ```python block under that heading) runs as written, from a directory
  laid out like the repository root: exp/ is the repository's own (the shipped checkpoints) and
  data/cifar10-jpeg a tiny 10-class stand-in of the JPEG copy, so the test needs no data set and writes nothing
  into the working tree.
- Every flag on its `main_cifar.py` / `main_imagenet.py` command lines exists in that script's parser (read
  from the `-h` output of the scripts run as subprocesses), and its `--model` names are registered.
- Its training examples write under runs/, never into the shipped exp/ tree.
- Set-up, CI and packaging agree: .ci/run installs requirements-dev.txt and runs the README's test command;
  pyproject.toml's dependencies are requirements.txt's (CuPy as the "cuda" extra); one version everywhere.
"""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from synthetic import make_image_folder

SCRIPTS = ("main_cifar.py", "main_imagenet.py")
# a command line: `python SCRIPT ...` or `torchrun [its flags] SCRIPT ...`, up to the end of the line, a closing
# backtick or a table cell's end (continuation lines are joined first)
COMMAND = re.compile(r"(?:\bpython\s+|\btorchrun\b[^\n`|]*?\s)(main_(?:cifar|imagenet)\.py)\b([^\n`|]*)")
FLAG = re.compile(r"^--?[A-Za-z][\w-]*")


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def section(text, heading):
    """The text under `## heading`, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(heading)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def python_api_block():
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", section(read("README.md"), "Python API"), re.M | re.S)
    assert len(blocks) == 1, f"expected one ```python block under '## Python API', found {len(blocks)}"
    return blocks[0]


def documentation():
    """README.md and every page under docs/: the commands they show are held to the same rules."""
    pages = ["README.md"] + sorted(os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs"))
                                   if n.endswith(".md"))
    return "\n".join(read(page) for page in pages)


def readme_commands():
    """[(script, [tokens after the script name])] for every command line of the README and docs/*.md."""
    text = documentation().replace("\\\n", " ")
    commands = []
    for script, rest in COMMAND.findall(text):
        tokens = []
        for token in rest.split():
            if token.startswith("#") or token in ("&&", "||", ";", "|", ">", ">>", "2>&1"):
                break
            tokens.append(token)
        commands.append((script, tokens))
    return commands


def flags(tokens):
    return {FLAG.match(t).group(0) for t in tokens if FLAG.match(t)}


def values_of(tokens, names):
    return [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t in names]


def parser_flags(help_text):
    """Every option string in an argparse help text (the option lines of its sections, aliases included)."""
    found = set()
    for line in help_text.splitlines():
        declaration = re.split(r"\s{2,}", line.strip())[0]
        if declaration.startswith("-"):
            found.update(re.findall(r"(?:^|, )(--?[A-Za-z][\w-]*)", declaration))
    return found


def test_readme_has_command_lines_for_both_scripts():
    commands = readme_commands()
    for script in SCRIPTS:
        assert sum(s == script for s, _ in commands) >= 3, f"found too few {script} command lines: {commands}"


def test_training_examples_write_under_runs():
    """New runs go to runs/...; exp/ holds the shipped checkpoints and no README example trains into it."""
    for script, tokens in readme_commands():
        for directory in values_of(tokens, ("-s", "--save_dir")):
            assert directory.startswith("runs/"), f"{script} {' '.join(tokens)}: -s {directory} is not under runs/"
        if "-e" not in tokens and "--evaluate" not in tokens:
            for directory in values_of(tokens, ("-r", "--resume")):
                assert not directory.startswith("exp/"), f"{script} {' '.join(tokens)}: resumes training in exp/"


@pytest.mark.slow
def test_readme_flags_exist_in_the_parsers():
    env = dict(os.environ, COLUMNS="200")
    procs = {script: subprocess.Popen([sys.executable, script, "-h"], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script in SCRIPTS}
    known = {}
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{script} -h failed: {err[-2000:]}"
        known[script] = parser_flags(out)
        assert {"-h", "--model", "--budget", "-s", "-r", "-e", "--data"} <= known[script], out
    from dynconv.models import list_models

    models = set(list_models())
    problems = []
    for script, tokens in readme_commands():
        unknown = flags(tokens) - known[script]
        if unknown:
            problems.append(f"{script} {' '.join(tokens)}: no flag {', '.join(sorted(unknown))}")
        problems += [f"{script} {' '.join(tokens)}: no model {m}" for m in values_of(tokens, ("--model",))
                     if m not in models]
    assert not problems, "README command lines that the parsers reject:\n" + "\n".join(problems)


@pytest.mark.slow
def test_python_api_block_runs(tmp_path, monkeypatch):
    code = python_api_block()
    os.symlink(os.path.join(ROOT, "exp"), tmp_path / "exp")
    make_image_folder(str(tmp_path / "data" / "cifar10-jpeg"), classes=10, per_class=2)
    monkeypatch.chdir(tmp_path)
    shipped = exp_files()
    namespace = {"__name__": "readme_python_api"}
    exec(compile(code, os.path.join(ROOT, "README.md") + " (## Python API)", "exec"), namespace)
    assert tuple(namespace["logits"].shape) == (8, 10)
    assert len(namespace["decisions"]) == 15  # ResNet-32: one per residual block
    metrics = namespace["metrics"]
    assert {"prec1", "mmac"} <= set(metrics) and 0 < metrics["mmac"] < 70.4  # below the all-on count
    assert sorted(os.listdir(tmp_path)) == ["data", "exp"], "the README's API block wrote files"
    assert exp_files() == shipped, "the README's API block wrote into the shipped exp/ tree"


def exp_files():
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(os.path.join(ROOT, "exp")) for f in files}


def test_ci_installs_the_readme_requirements_and_runs_its_test_command():
    ci = read(".ci/run")
    test_command = re.findall(r"^    (python -m pytest .*)$", section(read("README.md"), "Test"), re.M)[0]
    assert test_command == "python -m pytest -q tests"
    assert re.search(rf"^{re.escape(test_command)}$", ci, re.M), ".ci/run does not run the README's test command"
    assert re.search(r"^pip install (-q )?-r requirements-dev\.txt$", ci, re.M)
    assert "-r requirements.txt" in read("requirements-dev.txt").splitlines()
    setup = section(read("README.md"), "Set-up")
    for line in ("pip install -r requirements.txt", "pip install -r requirements-dev.txt"):
        assert line in setup


def requirement_lines(name):
    return [line.split("#")[0].strip() for line in read(name).splitlines()
            if line.split("#")[0].strip() and not line.startswith("-")]


def test_packaging_agrees_with_requirements_and_changelog():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads(read("pyproject.toml"))["project"]
    cuda = project["optional-dependencies"]["cuda"]
    assert sorted(project["dependencies"] + cuda) == sorted(requirement_lines("requirements.txt"))
    assert project["optional-dependencies"]["dev"] == requirement_lines("requirements-dev.txt")
    assert not any(r.startswith("pytest") for r in requirement_lines("requirements.txt"))
    import dynconv

    assert dynconv.__version__ == project["version"]
    assert re.search(rf"^## \[?{re.escape(project['version'])}\]?\b", read("CHANGELOG.md"), re.M)
