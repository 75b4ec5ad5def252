"""MkDocs hooks (mkdocs.yml ``hooks:``): the site's home page is README.md, read at build time.

README.md is the front door on the repository's page and links the pages as ``docs/<page>.md``;
on the site those pages sit beside the home page, so the prefix goes. One text serves both, so they
cannot drift apart, and a README link to a page that does not exist fails the strict build.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

# a Markdown link target that starts with docs/: ](docs/es.md) or ](docs/es.md#anchor)
_DOCS_LINK = re.compile(r"\]\(docs/")


def readme_as_home(text: str) -> str:
    """README.md's text with its ``docs/`` links made relative to the docs folder."""
    return _DOCS_LINK.sub("](", text)


def on_files(files: Files, config) -> Files:
    readme = Path(config.config_file_path).parent / "README.md"
    if files.get_file_from_path("index.md") is not None:
        raise ValueError("docs/index.md exists: the home page is README.md (scripts/mkdocs_hooks.py)")
    files.append(
        File.generated(config, "index.md", content=readme_as_home(readme.read_text(encoding="utf-8")))
    )
    return files
