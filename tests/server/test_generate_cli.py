"""``ithaca generate`` on a terminal: a progress bar over the steps (and over the frames
while a video is encoded), none with ``--quiet``; unknown prompt words are named."""

import io
import sys

import av
import pytest

from ithaca.cli import main


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def readouterr(self) -> str:
        text = self.getvalue()
        self.seek(0)
        self.truncate()
        return text


@pytest.fixture
def terminal(monkeypatch):
    """stderr that says it is a terminal (installed by the test: pytest's capture swaps
    ``sys.stderr`` again between fixture set-up and the test call)."""
    stream = _Terminal()
    return lambda: monkeypatch.setattr(sys, "stderr", stream) or stream


def test_progress_bar_over_steps_and_quiet(tmp_path, terminal):
    terminal = terminal()
    out = tmp_path / "a.png"
    args = ["generate", "--prompt", "a red circle and a purple fox", "--width", "64",
            "--height", "64", "--num-inference-steps", "3", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    err = terminal.readouterr()
    assert "3/3" in err and "steps" in err
    assert "unknown words for this model: fox" in err
    assert main([*args, "--quiet"]) == 0
    assert "3/3" not in terminal.readouterr()


def test_progress_bar_over_frames_for_video(tmp_path, terminal, tiny_wan):
    terminal = terminal()
    wan = tiny_wan["t2v_a14b"]
    out = tmp_path / "a.mp4"
    args = ["generate", "--model", str(wan), "--prompt", "a cat", "--width", "32",
            "--height", "32", "--num-frames", "9", "--num-inference-steps", "2",
            "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    err = terminal.readouterr()
    assert "2/2" in err and "9/9" in err and "frames" in err
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(c.streams.video[0])) == 9
