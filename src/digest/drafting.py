"""Pure: essays and their ranked comments + settings → a :class:`Draft` (or nothing)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from digest.config import Settings
from digest.types import Draft, DraftItem, Essay, RankedComment


def subject_for(settings: Settings, essays: Sequence[Essay]) -> str:
    """The subject from ``digest.subject`` (placeholders: {name}, {first_title}, {count})."""
    first = essays[0].title if essays else ""
    count = len(essays)
    subject = settings.digest.subject.format_map(
        {"name": settings.newsletter.name, "first_title": first, "count": count}
    )
    if "{first_title}" in settings.digest.subject and count > 1:
        subject += f" (+{count - 1} more)"
    # Rule 5: nothing from a feed may smuggle a line break into a header.
    return " ".join(subject.split())[:250]


def compose(
    period_key: str,
    essays: Sequence[tuple[int, Essay]],
    ranked: Mapping[int, Sequence[RankedComment]],
    settings: Settings,
) -> tuple[Draft, list[tuple[int, int | None]]] | None:
    """Build the draft for a period; ``None`` when there is nothing new (no empty digests).

    Returns the draft and its (essay id, comment id) references, which the store keeps so the
    next draft knows what was already featured.
    """
    if not essays:
        return None
    ordered = sorted(essays, key=lambda pair: (pair[1].published is None, pair[1].published, pair[0]))
    items = tuple(DraftItem(essay=e, comments=tuple(ranked.get(i, ())), is_new=True) for i, e in ordered)
    refs: list[tuple[int, int | None]] = [(i, None) for i, _ in ordered]
    draft = Draft(
        period_key=period_key,
        subject=subject_for(settings, [e for _, e in ordered]),
        intro=settings.digest.intro,
        items=items,
    )
    return draft, refs
