"""The documentation's links: every relative link and ``#anchor`` in README.md and docs/*.md points
at an existing file and, for a Markdown file, at one of its headings (GitHub's anchor rules);
http(s) and other URLs with a scheme are not checked. Every docs page is reachable from the README,
opens with its command, and the README stays a short front door."""
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`+[^`]*`+")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.MULTILINE)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_pages(root: Path = ROOT) -> List[Path]:
    """README.md and every docs/*.md of ``root``."""
    return [root / "README.md"] + sorted((root / "docs").glob("*.md"))


def outside_fences(text: str) -> List[str]:
    """The lines of a Markdown text, those of fenced code blocks (fences included) left empty."""
    lines, in_fence = [], False
    for line in text.splitlines():
        fence = bool(FENCE.match(line))
        in_fence ^= fence
        lines.append("" if fence or in_fence else line)
    return lines


def github_slug(title: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lowercased, punctuation other than
    ``-`` and ``_`` removed, each space a ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link renders as its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def heading_anchors(path: Path) -> Set[str]:
    """Every anchor of a Markdown file's headings; a repeated slug gets ``-1``, ``-2``... as on GitHub."""
    anchors: Set[str] = set()
    seen: Dict[str, int] = {}
    for line in outside_fences(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def link_targets(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, target) of every inline, image and reference-definition link outside code;
    a link's text may run over several lines."""
    text = "\n".join(outside_fences(path.read_text(encoding="utf-8")))
    text = CODE_SPAN.sub(lambda span: re.sub(r"[^\n]", " ", span.group()), text)  # keeps line numbers
    matches = sorted([*INLINE_LINK.finditer(text), *REFERENCE_LINK.finditer(text)], key=lambda m: m.start())
    for match in matches:
        yield text.count("\n", 0, match.start()) + 1, match.group(1)


def broken_links(path: Path) -> List[str]:
    """One message ``file:line: link 'target': why`` per link of ``path`` that does not resolve."""
    problems = []
    for number, target in link_targets(path):
        if SCHEME.match(target):
            continue  # http(s), mailto...: not checked
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.name}:{number}: link '{target}'"
        if not destination.exists():
            problems.append(f"{where}: no file {destination}")
        elif anchor and destination.suffix == ".md" and anchor not in heading_anchors(destination):
            problems.append(f"{where}: no heading with anchor '#{anchor}' in {destination.name}")
    return problems


def test_slugs_follow_github_rules():
    assert github_slug("Quick start") == "quick-start"
    assert github_slug("Why is my detector weak? `validation.py --report`") == \
        "why-is-my-detector-weak-validationpy---report"
    assert github_slug("The paper's detector: VGG16 (`--recipe paper-vgg16`)") == \
        "the-papers-detector-vgg16---recipe-paper-vgg16"
    assert github_slug("Long runs, clusters & preemption") == "long-runs-clusters--preemption"
    assert github_slug("`train_multi_GPU.py` [flags](x.md)") == "train_multi_gpupy-flags"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path):
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve()
              for _, target in link_targets(ROOT / "README.md") if not SCHEME.match(target)}
    assert [page.name for page in doc_pages()[1:] if page.resolve() not in linked] == []


def test_the_readme_is_a_front_door():
    """Under 350 lines, with one example for each everyday command."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 350
    for command in ("Train", "Resume", "Validate", "Predict", "Export"):
        section = text.split(f"\n### {command}\n", 1)[1]
        assert section.lstrip().startswith("```bash\npython "), command


@pytest.mark.parametrize("page", doc_pages()[1:], ids=lambda page: page.name)
def test_every_docs_page_opens_with_its_command(page: Path):
    """A title, then the command a user types, before any prose."""
    lines = [line for line in page.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert lines[0].startswith("# ") and lines[1] == "```bash"


def test_a_broken_link_or_anchor_is_reported(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "picture.png").write_bytes(b"\x89PNG")
    (tmp_path / "docs" / "page.md").write_text(
        "# Page\n\n## Same\n\n## Same\n\n```bash\n# not a heading\n```\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("\n".join([
        "# Top",
        "[ok](docs/page.md#same-1) ![ok](docs/picture.png) [ok](#top) [web](https://x.invalid/a.md)",
        "`[in code](missing.md)`",
        "```",
        "[in a fence](missing.md)",
        "```",
        "[gone](docs/gone.md) and [bad anchor](docs/page.md#same-2)",
        "[no heading from a fence](docs/page.md#not-a-heading)",
        "[self](#nowhere)",
        "[ref]: docs/missing.png",
        "[a link over",
        "two lines](docs/page.md#nowhere)",
    ]) + "\n", encoding="utf-8")
    assert [page.name for page in doc_pages(tmp_path)] == ["README.md", "page.md"]
    assert broken_links(tmp_path / "docs" / "page.md") == []
    assert broken_links(tmp_path / "README.md") == [
        f"README.md:7: link 'docs/gone.md': no file {tmp_path / 'docs' / 'gone.md'}",
        "README.md:7: link 'docs/page.md#same-2': no heading with anchor '#same-2' in page.md",
        "README.md:8: link 'docs/page.md#not-a-heading': no heading with anchor '#not-a-heading' in page.md",
        "README.md:9: link '#nowhere': no heading with anchor '#nowhere' in README.md",
        f"README.md:10: link 'docs/missing.png': no file {tmp_path / 'docs' / 'missing.png'}",
        "README.md:11: link 'docs/page.md#nowhere': no heading with anchor '#nowhere' in page.md",
    ]
