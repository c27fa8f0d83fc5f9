from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digest.config import Ranking
from digest.ranking import rank, wilson_lower_bound, word_count
from digest.types import Comment

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def c(key: str, score: float | None, author: str = "", words: int = 5, minutes: int = 0,
      position: int | None = None) -> Comment:
    return Comment(source="s", essay_key="e", key=key, author=author or f"author-{key}",
                   html="<p>" + " ".join(["word"] * words) + "</p>", score=score,
                   published=T0 + timedelta(minutes=minutes), position=position)


def keys(result: dict[int, tuple]) -> dict[int, list[str]]:  # type: ignore[type-arg]
    return {k: [r.comment.key for r in v] for k, v in result.items()}


def test_highest_scores_win_within_per_essay() -> None:
    policy = Ranking(per_essay=2, max_comments=10, one_per_author=False)
    result = rank({1: [c("a", 3), c("b", 10), c("c", 7)]}, policy)
    assert keys(result) == {1: ["b", "c"]}


def test_min_score_min_words_and_empty_comments() -> None:
    policy = Ranking(min_score=5, min_words=3, per_essay=10, max_comments=10)
    result = rank({1: [c("low", 4), c("short", 9, words=2), c("ok", 5), c("empty", 50, words=0)]}, policy)
    assert keys(result) == {1: ["ok"]}


def test_overall_cap_takes_the_best_across_essays() -> None:
    policy = Ranking(per_essay=5, max_comments=3, one_per_author=False)
    result = rank({1: [c("a", 1), c("b", 50)], 2: [c("c", 40), c("d", 30), c("e", 2)]}, policy)
    assert keys(result) == {1: ["b"], 2: ["c", "d"]}


def test_one_per_author_keeps_their_best() -> None:
    policy = Ranking(per_essay=5, max_comments=10, one_per_author=True)
    result = rank({1: [c("a", 5, author="Priya"), c("b", 9, author="priya ")], 2: [c("c", 7, author="PRIYA")]},
                  policy)
    assert keys(result) == {1: ["b"], 2: []}


def test_essay_author_replies_are_left_out() -> None:
    policy = Ranking(per_essay=5, max_comments=10)
    result = rank({1: [c("a", 100, author="Mara Ellison"), c("b", 1)]}, policy, {1: "Mara Ellison"})
    assert keys(result) == {1: ["b"]}


def test_ties_break_by_age_then_key() -> None:
    policy = Ranking(per_essay=3, max_comments=10, one_per_author=False)
    result = rank({1: [c("z", 5, minutes=1), c("y", 5, minutes=1), c("x", 5, minutes=2)]}, policy)
    assert keys(result) == {1: ["y", "z", "x"]}


def test_order_only_comments_rank_by_display_position() -> None:
    policy = Ranking(per_essay=4, max_comments=10, one_per_author=False)
    result = rank({1: [c("u2", None, position=2), c("u1", None, position=0), c("u3", None, position=1)]}, policy)
    assert keys(result) == {1: ["u1", "u3", "u2"]}
    assert [r.rank_score for r in result[1]] == [1.0, round(1 / math.sqrt(2), 6), round(1 / math.sqrt(3), 6)]


def test_sources_on_different_scales_are_normalized() -> None:
    # Reddit-like points in the thousands, Discourse-like likes in tens: each source's best is 1.0.
    big = [Comment("reddit", "e", f"r{i}", f"r{i}", "<p>a b c</p>", score=s) for i, s in enumerate([3000, 40, 5])]
    small = [Comment("discourse", "e", f"d{i}", f"d{i}", "<p>a b c</p>", score=s) for i, s in enumerate([12, 9, 1])]
    policy = Ranking(per_essay=4, max_comments=4, one_per_author=False)
    picked = keys(rank({1: big + small}, policy))[1]
    assert picked[:2] == ["d0", "r0"] or picked[:2] == ["r0", "d0"]
    assert set(picked) == {"r0", "d0", "d1", "r1"}


def test_wilson_lower_bound_prefers_confidence() -> None:
    assert wilson_lower_bound(0, 0) == 0
    assert wilson_lower_bound(3, 0) < wilson_lower_bound(90, 10)
    assert wilson_lower_bound(90, 10) == pytest.approx(0.8256, abs=1e-3)
    few = Comment("s", "e", "few", "a", "<p>x y z</p>", score=3, upvotes=3, downvotes=0)
    many = Comment("s", "e", "many", "b", "<p>x y z</p>", score=80, upvotes=90, downvotes=10)
    assert keys(rank({1: [few, many]}, Ranking(per_essay=1)))[1] == ["many"]


def test_freshness_decay_prefers_new_comments() -> None:
    old = c("old", 10, minutes=0)
    new = c("new", 6, minutes=60 * 24 * 28)
    now = T0 + timedelta(days=28)
    assert keys(rank({1: [old, new]}, Ranking(per_essay=1)))[1] == ["old"]
    assert keys(rank({1: [old, new]}, Ranking(per_essay=1, half_life_days=7), now=now))[1] == ["new"]


def test_long_comments_are_cut_at_a_sentence() -> None:
    body = "<p>" + "This is a sentence of eight words here. " * 10 + "</p>"
    long = Comment("s", "e", "k", "a", body, url="https://x.org/c/k", score=1)
    (ranked,) = rank({1: [long]}, Ranking(max_words=20))[1]
    assert ranked.truncated and ranked.comment.html.endswith("here.</p>")
    assert word_count(ranked.comment.html) == 24
    assert ranked.words == 80  # ranking used the whole comment


def test_replies_quote_their_parent_and_author_replies_are_context() -> None:
    parent = Comment("s", "e", "p", "Ann", "<p>I think the pager should ring less often.</p>", score=9)
    reply = Comment("s", "e", "r", "Bo", "<p>Disagree, strongly.</p>", score=8, parent_key="p")
    author = Comment("s", "e", "m", "Mara", "<p>Thanks, Ann: agreed.</p>", score=50, parent_key="p")
    result = rank({1: [parent, reply, author]}, Ranking(per_essay=5), {1: "Mara"})
    by_key = {r.comment.key: r for r in result[1]}
    assert set(by_key) == {"p", "r"}
    assert by_key["r"].reply_to_author == "Ann"
    assert by_key["r"].reply_to_excerpt == "I think the pager should ring less often."
    assert by_key["p"].author_reply_author == "Mara" and "agreed" in by_key["p"].author_reply_html
    excluded = rank({1: [parent, author]}, Ranking(author_replies="exclude"), {1: "Mara"})
    assert excluded[1][0].author_reply_html == ""


def test_excluded_authors_are_never_picked() -> None:
    result = rank({1: [c("a", 50, author="AutoModerator"), c("b", 1)]}, Ranking(exclude_authors=("automoderator",)))
    assert keys(result) == {1: ["b"]}


def test_word_count_ignores_markup() -> None:
    assert word_count("<p>one <b>two</b></p><p>three&nbsp;four</p>") == 4


comment_strategy = st.builds(
    c,
    key=st.text(alphabet="abcdefgh", min_size=1, max_size=4),
    score=st.one_of(st.none(), st.integers(-5, 50).map(float)),
    author=st.sampled_from(["ann", "bo", "cy", "di", "ed"]),
    words=st.integers(0, 30),
    minutes=st.integers(0, 100),
    position=st.one_of(st.none(), st.integers(0, 20)),
)


@settings(max_examples=150, deadline=None)
@given(
    data=st.dictionaries(st.integers(1, 4), st.lists(comment_strategy, max_size=12), max_size=4),
    per_essay=st.integers(0, 5),
    max_comments=st.integers(0, 12),
    min_score=st.integers(-2, 20),
    min_words=st.integers(0, 10),
    one_per_author=st.booleans(),
)
def test_ranking_is_deterministic_and_respects_every_limit(
    data: dict[int, list[Comment]], per_essay: int, max_comments: int, min_score: int, min_words: int,
    one_per_author: bool,
) -> None:
    # Keys must be unique per source, as the store guarantees.
    seen: set[str] = set()
    data = {e: [x for x in cs if not (x.key in seen or seen.add(x.key))] for e, cs in data.items()}  # type: ignore[func-returns-value]
    policy = Ranking(per_essay=per_essay, max_comments=max_comments, min_score=min_score,
                     min_words=min_words, one_per_author=one_per_author)
    first = rank(data, policy)
    shuffled = {e: list(reversed(cs)) for e, cs in reversed(list(data.items()))}
    assert keys(rank(shuffled, policy)) == keys(first)  # input order never matters
    picked = [r for rs in first.values() for r in rs]
    assert len(picked) <= max_comments
    assert all(len(rs) <= per_essay for rs in first.values())
    assert all(r.comment.score is None or r.comment.score >= min_score for r in picked)
    assert all(r.words >= max(min_words, 1) for r in picked)
    if one_per_author:
        authors = [r.comment.author for r in picked]
        assert len(authors) == len(set(authors))
