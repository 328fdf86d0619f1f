"""Progress: a plain line every interval when the stream is not a terminal, nothing when off."""

import io

import pytest

from moe.progress import Progress, close_open

pytestmark = pytest.mark.unit


class Clock:
    """A clock the test moves by hand (no sleeping, no timing assertions)."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_plain_lines_come_at_the_interval_and_once_at_the_end():
    stream, clock = io.StringIO(), Clock()
    with Progress(100, "train", stream=stream, interval_s=10.0, clock=clock) as bar:
        for _ in range(100):
            clock.t += 0.5  # 100 steps over 50 s -> a line at 10, 20, 30, 40 s; at 50 s the phase is done
            bar.update(1)
            bar.set_postfix(loss="0.5")
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert len(lines) == 5  # 4 on the interval + the closing line (none for 100/100 before it)
    assert lines[0] == "train: 20/100 steps (20%), 2 steps/s, 40s left, loss=0.5"
    assert lines[-1] == "train: 100/100 steps (100%), took 50s, loss=0.5"


def test_interrupted_phase_says_it_stopped_and_context_manager_closes_on_error():
    stream, clock = io.StringIO(), Clock()
    with pytest.raises(KeyboardInterrupt), Progress(10, "dense baselines", unit="tasks", stream=stream,
                                                     clock=clock) as bar:
        clock.t += 75.0
        bar.update(3)  # first line: 75 s >= the 10 s interval
        raise KeyboardInterrupt
    lines = stream.getvalue().splitlines()
    assert lines == ["dense baselines: 3/10 tasks (30%), 0.04 tasks/s, 2m55s left",
                     "dense baselines: 3/10 tasks (30%), stopped after 1m15s"]


def test_disabled_progress_writes_nothing_and_set_position_resets_the_rate():
    stream, clock = io.StringIO(), Clock()
    off = Progress(5, "x", enabled=False, stream=stream, clock=clock)
    off.update(5)
    off.close()
    assert stream.getvalue() == "" and off.n == 5
    bar = Progress(100, "train", stream=stream, clock=clock, initial=40)
    clock.t += 20.0
    bar.set_position(30)  # a rollback: the 10 steps lost are not counted as progress
    clock.t += 10.0
    bar.update(10)
    assert stream.getvalue().splitlines() == ["train: 40/100 steps (40%), 1 steps/s, 1m00s left"]


def test_close_open_ends_every_open_display_once():
    stream, clock = io.StringIO(), Clock()
    a = Progress(3, "a", stream=stream, clock=clock)
    Progress(3, "b", stream=stream, clock=clock).close()
    close_open()
    close_open()
    a.close()
    assert stream.getvalue().splitlines() == ["b: 0/3 steps (0%), stopped after 0s",
                                              "a: 0/3 steps (0%), stopped after 0s"]


def test_a_terminal_gets_a_tqdm_bar():
    stream = io.StringIO()
    with Progress(4, "train", stream=stream, terminal=True) as bar:
        bar.update(4)
    assert "\r" in stream.getvalue() and "4/4" in stream.getvalue()


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval_s must be > 0, got 0"):
        Progress(1, "x", interval_s=0)
