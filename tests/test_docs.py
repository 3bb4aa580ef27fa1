"""The README and docs/ as a reader meets them: every relative link leads to a file (and a heading) that
exists, and the README's Quickstart and Tests blocks are still what .ci/run and the Quickstart run."""
import re
import subprocess
from pathlib import Path

import pytest

import quickstart_numbers
import replicate
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)


def fenced_block(text, heading):
    """The first ``` block under `heading` (a "## " line) of a markdown text."""
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```[a-z]*\n(.*?)```", section, re.S)[1]


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    text = page.read_text()
    links = [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]
    for target in links:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and file.suffix == ".md":
            headings = [slug(h) for h in re.findall(r"(?m)^#+ (.*)$", file.read_text())]
            assert anchor in headings, f"{page.name}: link to {target}: no such heading in {file.name}"


def test_every_doc_is_listed_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"docs/{page.name} is not listed in the README"


def test_ci_runs_the_readme_tests_block_and_it_installs_what_exists():
    awk = re.search(r"awk '(.*?)' README.md", (ROOT / ".ci" / "run").read_text(), re.S)[1]
    extracted = subprocess.run(["awk", awk, "README.md"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout
    block = fenced_block((ROOT / "README.md").read_text(), "## Tests")
    assert extracted == block
    assert block.splitlines()[-1] == "python -m pytest -q tests"
    for requirements in re.findall(r"-r (\S+)", block):
        assert (ROOT / requirements).is_file(), requirements


def test_the_quickstart_block_installs_and_runs_what_exists():
    block = fenced_block((ROOT / "README.md").read_text(), "## Quickstart")
    for requirements in re.findall(r"-r (\S+)", block):
        assert (ROOT / requirements).is_file(), requirements
    scripts = re.findall(r"^python (\S+\.py)", block, re.M)
    assert scripts and all((ROOT / script).is_file() for script in scripts), scripts


def test_the_quickstart_runs_the_arms_and_bases_that_its_test_checks():
    """tests/test_replicate.py checks base0's continual and CoIN arms against the committed answers: the
    README's command must run those arms, with the same flags, on the shipped bases (replicate.py's
    default)."""
    command = fenced_block((ROOT / "README.md").read_text(), "## Quickstart").splitlines()[-1]
    assert command.startswith("python replicate.py ") and "--bases" not in command
    readme_arms = replicate.parse_arms(re.search(r'--arms "([^"]*)"', command)[1])
    tested = quickstart_numbers.ARGS
    assert Path(tested[tested.index("--bases") + 1]).parent == replicate.TOY_BASES
    for arm, flags in replicate.parse_arms(tested[tested.index("--arms") + 1]).items():
        assert readme_arms[arm] == flags, arm
