"""mmjax's messages go through the `mmjax` logger: one `[mmjax] ` line each on the current
standard output; processes other than 0 keep warnings only."""

import logging

import pytest

from mmjax.runtime import log


@pytest.fixture
def restore_level():
    level = log.logger.level
    yield
    log.logger.setLevel(level)


def test_messages_are_one_prefixed_line_on_the_current_stdout(capsys, restore_level):
    log.info("resumed from runs/x/checkpoints/8")
    log.warning("WARNING: source csv:a.csv: 3 of 10 samples were bad")
    out, err = capsys.readouterr()
    assert out == (
        "[mmjax] resumed from runs/x/checkpoints/8\n"
        "[mmjax] WARNING: source csv:a.csv: 3 of 10 samples were bad\n"
    )
    assert err == ""


def test_other_processes_keep_warnings_only(capsys, monkeypatch, restore_level):
    monkeypatch.delenv("MMJAX_LOG_ALL_PROCESSES", raising=False)
    log.set_process(0)
    assert log.logger.level == logging.INFO
    log.set_process(3)
    log.info("compiled in 3.1s")
    log.warning("WARNING: slow host")
    assert capsys.readouterr().out == "[mmjax] WARNING: slow host\n"


def test_every_process_can_be_kept(monkeypatch, restore_level):
    monkeypatch.setenv("MMJAX_LOG_ALL_PROCESSES", "1")
    log.logger.setLevel(logging.INFO)
    log.set_process(1)
    assert log.logger.level == logging.INFO
