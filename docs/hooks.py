"""MkDocs hook (mkdocs.yml `hooks:`): the docstrings' Sphinx roles as links.

The docstrings cite other objects with Sphinx roles (:func:`train`, :mod:`~stablenets.nn.blocks`),
which Markdown renders as ``:func:<code>train</code>``. This hook drops the role and turns the
name into an optional autorefs cross-reference: a full ``stablenets...`` path as it is, a short
name when exactly one object on the same page ends with it (the one nearest the citing object
when several do). A target that cannot be found (a relative name documented on another page,
``matplotlib``) stays plain code, without a warning: the docstrings are the documentation, the
links a convenience.
"""

from __future__ import annotations

import bisect
import re
from os.path import commonprefix
from typing import Any

ROLE = re.compile(r":(?:func|mod|class|meth|attr|data|exc|obj):<code>(~?)([\w.]+)</code>")
ANCHOR = re.compile(r'id="(stablenets(?:\.\w+)*)"')


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    anchors = [(m.start(), m.group(1)) for m in ANCHOR.finditer(html)]
    positions = [start for start, _ in anchors]
    ids = {identifier for _, identifier in anchors}

    def link(match: re.Match[str]) -> str:
        tilde, name = match.groups()
        title = name.rsplit(".", 1)[-1] if tilde else name
        if name.startswith("stablenets.") or name == "stablenets":
            target = name
        else:
            candidates = sorted(i for i in ids if i.endswith("." + name))
            if not candidates:
                return f"<code>{title}</code>"
            index = bisect.bisect(positions, match.start()) - 1
            context = anchors[index][1] if index >= 0 else ""
            target = max(candidates, key=lambda i: len(commonprefix([i, context])))
        return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'

    return ROLE.sub(link, html)
