"""Every command README shows names a script that exists, flags that script accepts with values it parses, and
datasets that exist: README's commands run as written.

    python -m pytest tests/test_readme.py -q
"""
import dataclasses
import re
import shlex
from pathlib import Path

import pytest

import bench
import cli
import data
import infer
import train

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"data.py": data.Config, "train.py": train.Config, "infer.py": infer.Config, "bench.py": bench.Config}


def readme_commands(text):
    """Each `python SCRIPT.py ...` / `torchrun ... SCRIPT.py ...` command in README's bash blocks and inline code,
    as (line, script, args)."""
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    lines += re.findall(r"`((?:python|torchrun)[^`]*)`", text)
    commands = []
    for line in lines:
        line = re.sub(r"\s+#.*$", "", line)
        for part in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(part)
            scripts = [i for i, w in enumerate(words) if w.endswith(".py") and not w.startswith("-")]
            if words and words[0] in ("python", "python3", "torchrun") and scripts:
                i = scripts[0]
                if words[i:] == ["check_python.py"]:  # the install lines' first step, no flags: test_install.py runs it
                    continue
                commands.append((line.strip(), words[i], words[i + 1:]))
    return commands


COMMANDS = readme_commands((ROOT / "README.md").read_text())


def test_readme_shows_the_commands_of_every_script():
    assert {script for _, script, _ in COMMANDS} == set(CONFIGS), COMMANDS
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("line, script, args", COMMANDS, ids=[c[0][:60] for c in COMMANDS])
def test_every_readme_command_names_a_script_its_flags_and_datasets_that_exist(line, script, args):
    assert (ROOT / script).is_file(), f"{line}: no {script}"
    parser = cli.config_parser(CONFIGS[script], "", defaults=False)
    if args == ["--help"]:
        return
    try:
        given = vars(parser.parse_args(args))
    except SystemExit:
        pytest.fail(f"README command does not parse: {line}")
    datasets = given.get("dataset", [])
    for name in [datasets] if isinstance(datasets, str) else datasets:
        path_like = "/" in name or name.endswith(".json") or name.isupper()  # a user's own file or folder
        assert path_like or name in data.EMBEDDED or name == data.FAMILY, f"{line}: no dataset {name!r}"


def test_the_checker_catches_a_missing_flag_and_a_missing_dataset():
    bad = readme_commands("```bash\npython train.py --model smollm2 --dataset tests-family  # CPU\n"
                          "python infer.py --no-such-flag\n```")
    assert [script for _, script, _ in bad] == ["train.py", "infer.py"]
    for line, script, args in bad:
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            test_every_readme_command_names_a_script_its_flags_and_datasets_that_exist(line, script, args)


@pytest.mark.parametrize("script", sorted(CONFIGS))
def test_no_script_imports_from_tests(script):
    source = (ROOT / script).read_text()
    assert not re.search(r"^\s*(from tests\b|import tests\b|from (conftest|families|test_\w+) import)", source, re.M)


def test_a_flag_the_scripts_share_has_one_help_text_and_one_default():
    """--device, --backend, --limit and --views mean one thing in every script that takes them: one declaration."""
    seen = {}
    for script, config in CONFIGS.items():
        for f in dataclasses.fields(config):
            if f.name in cli.SHARED:
                seen.setdefault(f.name, set()).add((f.default, f.metadata["help"], tuple(f.metadata.get("old", ()))))
    assert set(seen) == set(cli.SHARED), seen
    assert all(len(declared) == 1 for declared in seen.values()), seen
    assert {name for name, declared in seen.items()} >= {"device", "backend", "limit", "views", "gpus"}


@pytest.mark.parametrize("script, old, new, value", [("train.py", "--limit-tasks", "--limit", "3"),
                                                     ("infer.py", "--merge", "--join-shards", None),
                                                     ("infer.py", "--limit-tasks", "--limit", "3")])
def test_an_old_spelling_still_works_and_names_the_new_one(script, old, new, value, capsys):
    args = [old] + ([value] if value else [])
    cfg = cli.parse_config(CONFIGS[script], "", args)
    field = new[2:].replace("-", "_")
    assert getattr(cfg, field) == (int(value) if value else True)
    assert f"note: {old} is now {new}" in capsys.readouterr().err


@pytest.mark.parametrize("module", sorted(p.name for p in ROOT.glob("*.py")))
def test_nothing_is_defined_after_the_main_block(module):
    """A script run as a command stops at `if __name__ == "__main__":`: a function defined below it does not exist
    then (a name error only a run as a script shows)."""
    import ast
    body = ast.parse((ROOT / module).read_text()).body
    mains = [i for i, node in enumerate(body) if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    early = [i for i in mains if ast.unparse(body[i].body[0]) == "cli.stop_while_loading()" and len(body[i].body) == 1]
    assert not mains or [i for i in mains if i not in early] == [len(body) - 1], module
    assert all(all(isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr)) for node in body[:i]) for i in early), \
        f"{module}: the handler for its imports comes before them, after its docstring only"
