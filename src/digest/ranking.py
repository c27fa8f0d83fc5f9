"""Pure: score reader comments and pick the ones worth a reader's time.

Comments with a score (likes, points, reactions) rank by it; comments from sources without
ratings rank after every scored comment, in the source's own display order, and the
``min_score`` floor does not apply to them (there is nothing to compare it with). Ties are
broken by earlier publication, then by source and key, so the same data always gives the
same picks.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from digest.config import Ranking
from digest.types import Comment, RankedComment

_TAG = re.compile(r"<[^>]*>")
_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


def word_count(fragment: str) -> int:
    """Words in an HTML fragment's text."""
    return len(html.unescape(_TAG.sub(" ", fragment)).split())


def sort_key(c: Comment) -> tuple[int, float, datetime, str, str]:
    """Best first: scored before unscored, higher score, then older, then stable ids."""
    if c.score is not None:
        return (0, -c.score, c.published or _FAR_FUTURE, c.source, c.key)
    return (1, float(c.position if c.position is not None else 1_000_000), c.published or _FAR_FUTURE,
            c.source, c.key)


def rank(comments_by_essay: Mapping[int, Sequence[Comment]], policy: Ranking,
         essay_authors: Mapping[int, str] | None = None) -> dict[int, tuple[RankedComment, ...]]:
    """Pick comments per essay under ``policy``; keys are the caller's essay ids.

    Limits, all enforced together: ``min_score``; ``min_words``; ``per_essay``;
    ``max_comments`` over the whole digest; ``one_per_author`` over the whole digest (an
    essay's own author never takes a reader's place, so their replies are left out).
    """
    pool: list[tuple[tuple[int, float, datetime, str, str], int, Comment, int]] = []
    authors = essay_authors or {}
    for essay_id, comments in comments_by_essay.items():
        for c in comments:
            words = word_count(c.html)
            if words < max(policy.min_words, 1):
                continue
            if c.score is not None and c.score < policy.min_score:
                continue
            if c.author and c.author.casefold() == authors.get(essay_id, "").casefold():
                continue
            pool.append((sort_key(c), essay_id, c, words))
    pool.sort(key=lambda entry: (entry[0], entry[1]))
    picked: dict[int, list[RankedComment]] = {essay_id: [] for essay_id in comments_by_essay}
    seen_authors: set[str] = set()
    total = 0
    for key, essay_id, c, words in pool:
        if total >= policy.max_comments:
            break
        if len(picked[essay_id]) >= policy.per_essay:
            continue
        author = c.author.casefold().strip()
        if policy.one_per_author and author:
            if author in seen_authors:
                continue
            seen_authors.add(author)
        picked[essay_id].append(RankedComment(c, c.score if c.score is not None else -key[1], words))
        total += 1
    return {essay_id: tuple(v) for essay_id, v in picked.items()}
