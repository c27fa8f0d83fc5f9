"""Pure: score reader comments on one scale and pick the ones worth a reader's time.

Sources rate comments on different scales (Discourse likes, Reddit points, Substack
reactions) or not at all (Hacker News, WordPress, comment feeds: only an order). Each
comment gets one **normalized score** in [0, 1]:

* up and down votes known, ``ranking.confidence: true``: the lower bound of the 95 % Wilson
  interval of ``up / (up + down)``, so 3 of 3 ranks below 90 of 100;
* a score known: ``log(1 + max(score, 0)) / log(1 + top)``, where ``top`` is the highest score
  from that source among the candidates (at least 1): each source's best comment scores 1,
  and a source that counts in thousands cannot drown one that counts in tens;
* only an order known (score ``None``): ``1 / sqrt(1 + position)``: the first comment in the
  source's own display order scores 1, the fourth 0.5.

With ``ranking.half_life_days`` set, the score is multiplied by ``0.5 ** (age / half_life)``
so fresh comments win over old ones. ``min_score`` compares the source's own score (a
comment with no score is exempt). Ties break by earlier publication, then by source and key,
so the same data always gives the same picks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from digest.config import Ranking
from digest.render.sanitize import html_to_text, truncate_html, truncate_text, word_count
from digest.types import Comment, RankedComment

_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)
Z95 = 1.959963984540054
QUOTE_CHARS = 160


def wilson_lower_bound(up: int, down: int, z: float = Z95) -> float:
    """Lower bound of the Wilson score interval for ``up`` of ``up + down`` positive votes."""
    n = up + down
    if n <= 0:
        return 0.0
    p = up / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt((p * (1 - p) + z * z / (4 * n)) / n)
    return max(0.0, (centre - spread) / (1 + z * z / n))


def normalized_scores(comments: Sequence[Comment], policy: Ranking,
                      now: datetime | None = None) -> dict[tuple[str, str], float]:
    """(source, key) → normalized score in [0, 1] (see the module docstring)."""
    top: dict[str, float] = {}
    for c in comments:
        if c.score is not None:
            top[c.source] = max(top.get(c.source, 1.0), c.score)
    out: dict[tuple[str, str], float] = {}
    for c in comments:
        if policy.confidence and c.upvotes is not None and c.downvotes is not None:
            value = wilson_lower_bound(max(c.upvotes, 0), max(c.downvotes, 0))
        elif c.score is not None:
            value = math.log1p(max(c.score, 0.0)) / math.log1p(top[c.source])
        else:
            value = 1 / math.sqrt(1 + max(c.position if c.position is not None else 99, 0))
        if policy.half_life_days and now is not None and c.published is not None:
            age_days = max((now - c.published).total_seconds(), 0.0) / 86400
            value *= 0.5 ** (age_days / policy.half_life_days)
        out[(c.source, c.key)] = value
    return out


def _quote(comment: Comment) -> str:
    return truncate_text(html_to_text(comment.html, links=False).replace("\n", " "), QUOTE_CHARS)


def rank(comments_by_essay: Mapping[int, Sequence[Comment]], policy: Ranking,
         essay_authors: Mapping[int, str] | None = None,
         now: datetime | None = None) -> dict[int, tuple[RankedComment, ...]]:
    """Pick comments per essay under ``policy``; keys are the caller's essay ids.

    Limits, all enforced together: ``min_score``; ``min_words``; ``per_essay``;
    ``max_comments`` over the whole digest; ``one_per_author`` over the whole digest;
    ``exclude_authors``. The essay's own author never takes a reader's place: their replies
    are shown under the comment they answer (``author_replies: context``) or left out.
    Comments longer than ``max_words`` are cut at a sentence boundary (``truncated``); a reply
    carries a short quote of what it answers.
    """
    authors = {k: v.casefold().strip() for k, v in (essay_authors or {}).items()}
    excluded = {a.casefold().strip() for a in policy.exclude_authors}
    everything = [c for cs in comments_by_essay.values() for c in cs]
    scores = normalized_scores(everything, policy, now)
    pool: list[tuple[tuple[float, datetime, str, str, int], int, Comment, int]] = []
    author_replies: dict[tuple[int, str], Comment] = {}
    for essay_id, comments in comments_by_essay.items():
        for c in comments:
            author = c.author.casefold().strip()
            if author and author == authors.get(essay_id):
                if c.parent_key and (essay_id, c.parent_key) not in author_replies:
                    author_replies[(essay_id, c.parent_key)] = c
                continue
            if author and author in excluded:
                continue
            words = word_count(c.html)
            if words < max(policy.min_words, 1):
                continue
            if c.score is not None and c.score < policy.min_score:
                continue
            key = (-scores[(c.source, c.key)], c.published or _FAR_FUTURE, c.source, c.key, essay_id)
            pool.append((key, essay_id, c, words))
    pool.sort(key=lambda entry: entry[0])
    by_key = {(essay_id, c.key): c for essay_id, cs in comments_by_essay.items() for c in cs}
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
        picked[essay_id].append(_ranked(c, -key[0], words, policy, by_key.get((essay_id, c.parent_key or "")),
                                        author_replies.get((essay_id, c.key))))
        total += 1
    return {essay_id: tuple(v) for essay_id, v in picked.items()}


def _ranked(c: Comment, score: float, words: int, policy: Ranking, parent: Comment | None,
            author_reply: Comment | None) -> RankedComment:
    html, truncated = truncate_html(c.html, policy.max_words)
    reply_html = ""
    reply_author = ""
    if author_reply is not None and policy.author_replies == "context":
        reply_html, _ = truncate_html(author_reply.html, policy.max_words)
        reply_author = author_reply.author
    return RankedComment(
        comment=replace(c, html=html) if truncated else c,
        rank_score=round(score, 6),
        words=words,
        truncated=truncated,
        reply_to_author=parent.author if parent is not None else "",
        reply_to_excerpt=_quote(parent) if parent is not None else "",
        author_reply_author=reply_author,
        author_reply_html=reply_html,
    )
