"""Rendering benchmark: MJML compile, full compile_draft, and per-recipient personalize.

Run: ``/work/venv/bin/python benchmarks/bench_render.py [--recipients N] [--compiles N]``

Builds a 10-essay, 30-comment digest of generated text at realistic lengths (summaries of
~60 words, comments of 40-250 words with links, quotes, lists and typographic characters),
then reports medians:

(a) ``mjml2html`` alone on the already-rendered MJML, warm;
(b) the whole ``compile_draft`` (sanitize, Jinja, MJML, text part, split);
(c) ``personalize`` for one recipient, in microseconds.

Goals: (a) ≤ 1 ms, (c) ≤ 5 µs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from mjml import mjml2html

from digest.config import Newsletter
from digest.render import SLOT_NAMES, compile_draft, personalize
from digest.render.compose import DIGEST_HTML, _base_context, _render
from digest.render.env import make_env
from digest.types import Comment, Draft, DraftItem, Essay, RankedComment

WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "for",
    "on",
    "with",
    "as",
    "was",
    "by",
    "at",
    "an",
    "be",
    "this",
    "from",
    "are",
    "or",
    "have",
    "not",
    "essay",
    "garden",
    "slow",
    "build",
    "craft",
    "winter",
    "letters",
    "river",
    "notes",
    "field",
    "memory",
    "light",
    "patience",
    "writing",
    "reading",
    "season",
    "walk",
    "repair",
    "tool",
    "habit",
    "kitchen",
    "library",
    "window",
    "morning",
    "evening",
    "attention",
    "practice",
    "ordinary",
    "small",
    "careful",
    "honest",
    "quiet",
    "stubborn",
    "generous",
    "question",
    # Real prose has typographic characters; one of them makes CPython store the whole text
    # part at two bytes per character, so the benchmark includes them.
    "it’s",
    "don’t",
    "—",
    "“yes”",
    "café",
]


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def _paragraph(rng: random.Random, words: int) -> str:
    out: list[str] = []
    while words > 0:
        n = min(words, rng.randint(8, 22))
        out.append(_sentence(rng, n))
        words -= n
    return " ".join(out)


def _comment_html(rng: random.Random, words: int) -> str:
    parts = [f"<p>{_paragraph(rng, words // 2)}</p>"]
    if rng.random() < 0.4:
        parts.append(f"<blockquote><p>{_paragraph(rng, 15)}</p></blockquote>")
    if rng.random() < 0.3:
        parts.append("<ul>" + "".join(f"<li>{_sentence(rng, 6)}</li>" for _ in range(3)) + "</ul>")
    link = f'<a href="https://example.org/ref/{rng.randint(1, 999)}">a related note</a>'
    parts.append(f"<p>{_paragraph(rng, words - words // 2)} See {link}.</p>")
    return "".join(parts)


def build_draft(essays: int = 10, comments_per_essay: int = 3, seed: int = 7) -> Draft:
    """A deterministic digest of generated text with realistic lengths."""
    rng = random.Random(seed)
    start = datetime(2026, 11, 2, 8, tzinfo=UTC)
    items: list[DraftItem] = []
    for e in range(essays):
        key = f"essay-{e}"
        url = f"https://fieldnotes.example.org/essays/{key}"
        essay = Essay(
            source="bench",
            key=key,
            url=url,
            title=_sentence(rng, rng.randint(3, 9)).rstrip("."),
            html=f"<p>{_paragraph(rng, 900)}</p>",
            summary=f"<p>{_paragraph(rng, 60)}</p>",
            author="Maren Holt",
            published=start - timedelta(days=e),
        )
        ranked: list[RankedComment] = []
        for c in range(comments_per_essay):
            words = rng.randint(40, 250)
            comment = Comment(
                source="bench",
                essay_key=key,
                key=f"{key}-c{c}",
                author=f"Reader {e}{c}",
                html=_comment_html(rng, words),
                url=f"{url}#comment-{c}",
                score=float(rng.randint(1, 90)),
            )
            ranked.append(
                RankedComment(comment=comment, rank_score=comment.score or 0.0, words=words)
            )
        items.append(DraftItem(essay=essay, comments=tuple(ranked)))
    return Draft(
        period_key="2026-W45",
        subject="Field Notes: ten essays and what readers said",
        intro="A week of slow builds and careful repairs.\n\nThe best of your replies are below.",
        items=tuple(items),
        id=1,
    )


def _median_ns(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """(median, min) of ``runs`` timed calls, in ns."""
    times: list[int] = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times), min(times)


def _median_batched_ns(
    fn: Callable[[], object], calls: int, batch: int = 1000
) -> tuple[float, float]:
    """(median, min) per-call time in ns over batches of ``batch`` calls.

    Timing each call alone would mostly measure perf_counter_ns itself (~50 ns).
    """
    per_call: list[float] = []
    for _ in range(max(1, calls // batch)):
        t0 = time.perf_counter_ns()
        for _ in range(batch):
            fn()
        per_call.append((time.perf_counter_ns() - t0) / batch)
    return statistics.median(per_call), min(per_call)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--compiles", type=int, default=200, help="runs for (a) and (b)")
    parser.add_argument("--recipients", type=int, default=200_000, help="calls for (c)")
    args = parser.parse_args(argv)

    newsletter = Newsletter.model_validate({"public_url": "https://fieldnotes.example.org"})
    draft = build_draft()

    # (a) MJML alone: render the template once, compile the same source many times.
    context = _base_context(draft, newsletter)
    context["slots"] = {s: f"DIGESTSLOT0123456789abcdef{s}0123456789abcdef" for s in SLOT_NAMES}
    mjml_source = _render(make_env(None), DIGEST_HTML, context)
    for _ in range(20):  # warm up
        mjml2html(mjml_source, fonts={})
    mjml_ns, mjml_min = _median_ns(lambda: mjml2html(mjml_source, fonts={}), args.compiles)

    # (b) The whole compile.
    for _ in range(5):
        compile_draft(draft, newsletter)
    compile_ns, compile_min = _median_ns(lambda: compile_draft(draft, newsletter), args.compiles)

    # (c) Personalize.
    compiled = compile_draft(draft, newsletter)
    html, text = personalize(
        compiled,
        name="Ann",
        unsubscribe_url="https://fieldnotes.example.org/u/x",
        preferences_url="https://fieldnotes.example.org/preferences/x",
    )
    unsub = (
        "https://fieldnotes.example.org/u/eyJzIjoxMjM0NX0.Zx9Kqw.abcdefghijklmnopqrstuvwxyz012345"
    )
    prefs = (
        "https://fieldnotes.example.org/preferences/eyJzIjoxMjM0NX0.Zx9Kqw.abcdefghijklmnopqrstuv"
    )

    def one() -> object:
        return personalize(
            compiled, name="Ann Example", unsubscribe_url=unsub, preferences_url=prefs
        )

    for _ in range(10_000):
        one()
    personalize_ns, personalize_min = _median_batched_ns(one, args.recipients)

    essays = len(draft.items)
    comments = sum(len(i.comments) for i in draft.items)
    html_bytes = len(html.encode())
    print(f"digest: {essays} essays, {comments} comments")
    print(f"  MJML source        {len(mjml_source):>8,} chars")
    print(f"  HTML output        {len(html):>8,} chars, {html_bytes:,} bytes UTF-8")
    print(f"  text output        {len(text):>8,} chars")
    print(f"  slots              html {compiled.html_slots}, text {compiled.text_slots}")
    print(
        f"(a) MJML compile, warm       median {mjml_ns / 1e6:7.3f} ms  (min {mjml_min / 1e6:.3f})"
        f"  goal <= 1 ms, {args.compiles} runs"
    )
    print(
        f"(b) compile_draft, full      median {compile_ns / 1e6:7.3f} ms  (min {compile_min / 1e6:.3f})"
        f"  {args.compiles} runs"
    )
    print(
        f"(c) personalize / recipient median {personalize_ns / 1e3:7.3f} us  "
        f"(min {personalize_min / 1e3:.3f})  goal <= 5 us, {args.recipients:,} calls"
    )
    print(f"    one personalize : one MJML compile = 1 : {mjml_ns / personalize_ns:,.0f}")
    total = (compile_ns + 100_000 * personalize_ns) / 1e9
    print(f"    compile once + personalize 100,000 recipients ~ {total:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
