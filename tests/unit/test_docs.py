"""The README and docs/ stay true to the code: every `swarm ...` command they show parses with
swarm's own parser, every job key they name exists, every file and page they point at exists
(swarm's own modules included), and the README stays a newcomer's page."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from swarm.cli import VERBS, build_parser
from swarm.config.models import JobConfig

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = {name: field.annotation for name, field in JobConfig.model_fields.items()}


def commands(text: str) -> list[str]:
    """`swarm ...` command lines in code blocks and inline code, comments and prompts removed."""
    found = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip().removeprefix("$ ")
            if line.startswith("swarm "):
                found.append(line)
    found += re.findall(r"`(swarm [^`]+)`", text)
    return found


def placeholders_filled(command: str) -> list[str]:
    """The command's words with [optional] and A|B placeholders resolved to one choice."""
    while re.search(r"\[[^\[\]]*\]", command):  # innermost [optional] parts first
        command = re.sub(r"\[([^\[\]]*)\]", lambda m: m.group(1).split("|")[0], command)
    try:
        words = shlex.split(command)
    except ValueError:  # an unbalanced quote in prose
        words = command.split()
    return [w.split("|")[0] for w in words[1:] if w != "..."]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_command_shown_parses(page):
    parser = build_parser()
    shown = commands(page.read_text())
    verbs = {name.replace("_", "-") for name in VERBS}
    for command in shown:
        words = placeholders_filled(command)
        if len(words) == 1 and not words[0].startswith("-"):  # a verb named in prose
            assert words[0] in verbs, f"{page.name} names `swarm {words[0]}`, which is no verb"
            continue
        try:
            parser.parse_args(words)
        except SystemExit as exc:
            if exc.code != 0 and not flags_exist(parser, words):  # --version and --help exit 0
                pytest.fail(f"{page.name}: `{command}` does not parse with swarm's parser")


def flags_exist(parser, words: list[str]) -> bool:
    """For a command shown without its required arguments: its verb and every flag exist."""
    verbs = parser._subparsers._group_actions[0].choices
    if not words or words[0] not in verbs:
        return False
    options = verbs[words[0]]._option_string_actions
    return all(w.split("=")[0] in options for w in words[1:] if w.startswith("--"))


# Pages about the cluster name the cluster file's keys (ray.metrics, ...), not the job's.
JOB_PAGES = [p for p in PAGES if p.name not in ("cluster.md", "setup-cluster.md")]
FILE_SUFFIXES = {"py", "md", "yaml", "json", "txt", "sh", "jsonl"}


@pytest.mark.parametrize("page", JOB_PAGES, ids=[p.name for p in JOB_PAGES])
def test_every_job_key_named_exists(page):
    for section, key in re.findall(r"`(model|quantization|lora|data|train|offload|output|ray)\.([a-z_]+)", page.read_text()):
        if key in FILE_SUFFIXES:
            continue
        fields = JobConfig.model_fields[section].annotation.model_fields
        assert key in fields, f"{page.name} names {section}.{key}, which the job does not have"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_file_and_page_pointed_at_exists(page):
    text = page.read_text()
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if not link.startswith("http"):
            assert (page.parent / link).exists(), f"{page.name} links to {link}"
    for path in re.findall(r"`((?:swarm|configs|tests|docs|launcher|docker)/[\w./-]+\.(?:yaml|py|sh|md|txt))`", text):
        assert (ROOT / path).exists(), f"{page.name} names {path}"


def test_the_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"the README does not link docs/{page.name}"
