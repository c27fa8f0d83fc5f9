"""`digest send`'s progress: a bar redrawn in place on a terminal, a line per batch otherwise."""

from __future__ import annotations

from collections import Counter

import pytest

from digest.cli import SendProgress
from digest.delivery.sender import SendSummary


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A terminal wide enough for the whole bar, unless a test says otherwise."""
    monkeypatch.setenv("COLUMNS", "200")


class Timer:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _summary(sent: int, total: int, batches: int, failed: int = 0, draft_id: int = 7) -> SendSummary:
    return SendSummary(draft_id, total=total, sent=sent, batches=batches,
                       failed=Counter({"rejected": failed} if failed else {}))


def test_a_terminal_gets_a_bar_with_share_rate_and_time_left(capsys: pytest.CaptureFixture[str]) -> None:
    timer = Timer()
    progress = SendProgress(interactive=True, timer=timer)
    timer.now = 100.0
    progress(_summary(0, 1000, 0), 0)
    timer.now = 102.0
    progress(_summary(240, 1000, 1, failed=10), 250)
    err = capsys.readouterr().err
    last = err.split("\r")[-1]
    assert "[######------------------]  25% 250/1,000 at 125/s, 6s left" in last
    assert "240 sent, 10 failed, 0 uncertain" in last
    assert "\n" not in err  # redrawn in place
    progress.close()
    assert capsys.readouterr().err == "\n"


def test_the_bar_is_redrawn_at_most_ten_times_a_second_but_always_at_the_end(
        capsys: pytest.CaptureFixture[str]) -> None:
    timer = Timer()
    progress = SendProgress(interactive=True, timer=timer)
    progress(_summary(100, 300, 1), 100)
    timer.now += 0.01
    progress(_summary(200, 300, 2), 100)  # too soon: skipped
    timer.now += 0.01
    progress(_summary(300, 300, 3), 100)  # the last one: drawn
    err = capsys.readouterr().err
    assert err.count("\r") == 2
    assert "100% 300/300" in err and "200/300" not in err and "left" not in err.split("\r")[-1]


def test_without_a_terminal_each_batch_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    timer = Timer()
    progress = SendProgress(interactive=False, timer=timer)
    progress(_summary(500, 1500, 1), 500)
    timer.now += 1
    progress(_summary(1000, 1500, 2), 500)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "draft 7: batch 1 (500): 500/1,500 done — 500 sent, 0 failed, 0 uncertain, 0/s",
        "draft 7: batch 2 (500): 1,000/1,500 done — 1,000 sent, 0 failed, 0 uncertain, 1,000/s",
    ]


def test_the_rate_counts_from_the_start_of_the_send(capsys: pytest.CaptureFixture[str]) -> None:
    """Workers finish their first batches together: the rate must not count from the first."""
    timer = Timer()
    progress = SendProgress(interactive=False, timer=timer)  # made as the send starts
    timer.now += 4
    progress(_summary(500, 2000, 1), 500)
    timer.now += 0.1
    progress(_summary(1000, 2000, 2), 500)
    assert capsys.readouterr().err.splitlines()[-1].endswith(", 244/s")  # 1,000 in 4.1 s


def test_a_second_draft_starts_a_new_bar_on_a_new_line(capsys: pytest.CaptureFixture[str]) -> None:
    timer = Timer()
    progress = SendProgress(interactive=True, timer=timer)
    progress(_summary(10, 10, 1, draft_id=1), 10)
    progress(_summary(5, 20, 1, draft_id=2), 5)
    err = capsys.readouterr().err
    first, second = err.split("\n")
    assert "draft 1 " in first and "100%" in first
    assert "draft 2 " in second and "25% 5/20" in second


@pytest.mark.parametrize("columns", [80, 60, 40, 12])
def test_the_bar_fits_one_row_of_the_terminal(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                              columns: int) -> None:
    """A line longer than the terminal wraps, and the next redraw clears only its last row: on
    an 80-column terminal every redraw left a row behind. The least useful parts go first."""
    monkeypatch.setenv("COLUMNS", str(columns))
    timer = Timer()
    progress = SendProgress(interactive=True, timer=timer)
    timer.now += 11
    summary = SendSummary(12, total=1_000_000, sent=498_000, batches=500, uncertain=1_000,
                          failed=Counter({"rejected": 2_000}))
    progress(summary, 1000)
    line = capsys.readouterr().err.split("\r")[-1].removeprefix("\x1b[2K")  # (click drops it off a terminal)
    assert len(line) <= columns - 1
    assert line == "50%" if columns == 12 else line.startswith("draft 12 ")
    if columns >= 60:
        assert " 50%" in line and "2,000 failed, 1,000 uncertain" in line
    if columns == 80:
        assert line == "draft 12  50% at 45,545/s, 11s left — 2,000 failed, 1,000 uncertain"


def test_slow_rates_keep_a_decimal(capsys: pytest.CaptureFixture[str]) -> None:
    """Resend's default of 2 calls a second read as "2/s", and anything under half a message
    a second as "0/s"."""
    timer = Timer()
    progress = SendProgress(interactive=False, timer=timer)
    timer.now += 4
    progress(_summary(10, 100, 1), 10)
    timer.now += 36
    progress(_summary(12, 100, 2), 2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith(", 2.5/s") and lines[1].endswith(", 0.3/s")
    progress = SendProgress(interactive=True, timer=timer)
    timer.now += 4
    progress(_summary(10, 100, 1), 10)
    assert " at 2.5/s, 36s left — " in capsys.readouterr().err
