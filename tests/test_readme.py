"""README.md stays a newcomer's page: at most 250 lines, and every `make` target and
`bnorder` subcommand it names exists (cheap structural checks, no command is run)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MAX_LINES = 250


def code(text: str) -> str:
    """The commands of a Markdown text: inline code spans and indented or fenced lines (the
    prose around them may use the same words in their ordinary sense)."""
    spans = re.findall(r"`([^`\n]+)`", text)
    blocks = [line for line in text.splitlines() if line.startswith("    ")]
    fenced = re.findall(r"^```.*?\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    return "\n".join(spans + blocks + fenced)


def make_targets(makefile: str):
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", makefile, re.MULTILINE))


def named_make_targets(text: str):
    return set(re.findall(r"\bmake[ \t]+([a-z][\w-]*)", text))


def named_subcommands(text: str):
    return set(re.findall(r"\bbnorder[ \t]+([a-z][\w-]*)", text))


def cli_subcommands():
    from bnorder import cli
    action = next(a for a in cli.build_parser()._actions
                  if a.__class__.__name__ == "_SubParsersAction")
    return set(action.choices)


def test_readme_is_short():
    lines = README.count("\n") + (not README.endswith("\n"))
    assert lines <= MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_every_make_target_it_names_exists():
    named = named_make_targets(code(README))
    assert {"run", "test"} <= named, "the two commands must be in the README"
    missing = named - make_targets((ROOT / "Makefile").read_text())
    assert not missing, f"README names make targets the Makefile lacks: {sorted(missing)}"


def test_every_subcommand_it_names_exists():
    named = named_subcommands(code(README))
    assert {"train", "study", "check", "models"} <= named
    missing = named - cli_subcommands()
    assert not missing, f"README names bnorder subcommands the CLI lacks: {sorted(missing)}"


def test_the_checks_catch_what_they_look_for():
    text = code("bnorder makes it fast: run `make run`, then `make benchh`;\n\n"
                "    bnorder trian --fused\n")
    assert named_make_targets(text) - make_targets((ROOT / "Makefile").read_text()) == \
        {"benchh"}
    assert named_subcommands(text) - cli_subcommands() == {"trian"}
    assert make_targets("all: x\nFOO := 1\nbench: setup\n") == {"all", "bench"}
