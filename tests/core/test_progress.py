"""Progress suits where it runs: a bar on a terminal; off it (a log file), plain lines at most every LOG_EVERY_S
and one when a step ends, never a bar's frames; nothing when quiet or for a quick step."""

import pytest

import ice_lightning.core.progress as progress_module
from ice_lightning.core.progress import pipeline_bar_config, progress, set_quiet


@pytest.fixture(autouse=True)
def _loud(monkeypatch):
    monkeypatch.setattr(progress_module, "_quiet", False)  # restored afterwards, as the session had it


def test_off_a_terminal_a_step_logs_plain_lines_and_a_quick_one_nothing(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)
    assert list(progress(range(5), desc="encoding prompts")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""  # under DELAY_S: nothing
    monkeypatch.setattr(progress_module, "DELAY_S", 0.0)
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)  # a line after every item
    assert sum(progress(range(3), desc="red-teaming", unit="concept")) == 3
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(" s")[0].rsplit(" ", 1)[0] for ln in lines] == [
        "red-teaming: 1/3 concept after", "red-teaming: 2/3 concept after", "red-teaming: 3/3 concept after",
        "red-teaming: 3/3 concept done in"]  # fmt: skip
    assert "\r" not in "".join(lines) and "|" not in "".join(lines)  # no bar frames in a log
    assert pipeline_bar_config("sampling")["disable"] is True


def test_on_a_terminal_a_bar_and_quiet_nothing(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "on_terminal", lambda: True)
    monkeypatch.setattr(progress_module, "DELAY_S", 0.0)
    assert list(progress(range(3), desc="sampling")) == [0, 1, 2]
    assert "sampling:" in capsys.readouterr().err  # tqdm's bar, drawn in place
    assert pipeline_bar_config("sampling") == {"desc": "sampling", "disable": False, "leave": False, "delay": 0.0,
                                               "dynamic_ncols": True}  # fmt: skip
    set_quiet(True)
    assert list(progress(range(3), desc="sampling")) == [0, 1, 2]
    assert capsys.readouterr().err == "" and pipeline_bar_config("x")["disable"] is True
