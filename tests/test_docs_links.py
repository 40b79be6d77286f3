"""The README's links into docs/ resolve, the snippets the docs include from it exist, and every
public name of the package has a place in the API reference.

`mkdocs build --strict` (in CI) checks the links between the docs pages; these tests cover what it
cannot see: the README itself, which is not part of the site.
"""

from __future__ import annotations

import re
import types
import unicodedata
from pathlib import Path

import pytest

import loramerge

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

_LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_HEADING = re.compile(r"^#{1,6}\s+(?P<text>.+?)\s*#*\s*$", re.MULTILINE)


def strip_code_blocks(markdown: str) -> str:
    """``markdown`` without its fenced code blocks (a ``# comment`` there is not a heading)."""
    return _FENCE.sub("", markdown)


def slug(heading: str) -> str:
    """The anchor mkdocs (Python-Markdown's toc) gives a heading; GitHub's agrees for plain words.

    Example:
        >>> slug("Image-generation LoRAs: merging an SDXL set")
        'image-generation-loras-merging-an-sdxl-set'
        >>> slug("Flux: fused q/k/v")
        'flux-fused-qkv'
    """
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    return {slug(m["text"]) for m in _HEADING.finditer(strip_code_blocks(page.read_text(encoding="utf-8")))}


def readme_links() -> list[str]:
    text = strip_code_blocks(README.read_text(encoding="utf-8"))
    return [m["target"] for m in _LINK.finditer(text) if not re.match(r"[a-z]+:", m["target"])]


def test_readme_links_to_docs_pages() -> None:
    docs_links = [t for t in readme_links() if t.startswith("docs/")]
    assert docs_links, "the README should link its docs/ pages"
    for page in ("docs/methods.md", "docs/formats.md", "docs/benchmarks.md", "docs/install.md"):
        assert any(t.split("#")[0] == page for t in docs_links), f"README does not link {page}"


@pytest.mark.parametrize("target", readme_links())
def test_readme_relative_link_resolves(target: str) -> None:
    path, _, anchor = target.partition("#")
    page = (ROOT / path) if path else README
    assert page.exists(), f"README.md links {target!r}, but {path} does not exist"
    if anchor:
        assert page.suffix == ".md", f"README.md links {target!r}: an anchor into a non-Markdown file"
        assert anchor in anchors(page), (
            f"README.md links {target!r}, but {page.relative_to(ROOT)} has no heading with that anchor"
        )


def test_docs_snippets_from_readme_exist() -> None:
    readme = README.read_text(encoding="utf-8")
    includes = [
        (page, m[1])
        for page in DOCS.rglob("*.md")
        for m in re.finditer(r'^--8<-- "README\.md:([\w-]+)"', page.read_text(encoding="utf-8"), re.MULTILINE)
    ]
    assert includes, "the docs include the README's tables"
    for page, name in includes:
        for edge in ("start", "end"):
            assert f"--8<-- [{edge}:{name}]" in readme, (
                f"{page.relative_to(ROOT)} includes README.md:{name}, but README.md has no [{edge}:{name}] marker"
            )


def documented_objects() -> tuple[set[str], set[str]]:
    """The facade names (``::: loramerge.NAME``) and the modules (``::: a.b``) the API pages render."""
    directives = {
        m[1]
        for page in (DOCS / "api").glob("*.md")
        for m in re.finditer(r"^::: ([\w.]+)\s*$", page.read_text(encoding="utf-8"), re.MULTILINE)
    }
    names = {d.split(".", 1)[1] for d in directives if d.count(".") == 1}
    return names, directives


@pytest.mark.parametrize("name", sorted(set(loramerge.__all__) - {"__version__"}))
def test_public_name_is_in_the_api_reference(name: str) -> None:
    names, modules = documented_objects()
    obj = getattr(loramerge, name)
    if isinstance(obj, types.ModuleType):
        assert obj.__name__ in modules, f"module loramerge.{name} is not on any docs/api page"
        return
    assert name in names or obj.__module__ in modules, (
        f"loramerge.{name} is exported but not documented: add `::: loramerge.{name}` to a page in docs/api/"
    )
