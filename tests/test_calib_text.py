"""permcompile.calib.text: the one sentence rule that calibration and ``eval`` share."""
from __future__ import annotations

import pytest

from permcompile.calib import data
from permcompile.calib.text import split_sentences


def test_sentences_end_at_punctuation_before_a_capital_and_keep_abbreviations():
    s = split_sentences('Mr. Allen was there. "Was he?" she asked! Yes.\n\nA new paragraph begins here.')
    assert s == ["Mr. Allen was there.", '"Was he?" she asked!', "A new paragraph begins here."]
    assert split_sentences("Dr. Who arrived at noon, e.g. early. It was 3 p.m. then.", min_words=1) == [
        "Dr. Who arrived at noon, e.g. early.", "It was 3 p.m. then."]


def test_blank_lines_separate_paragraphs_a_single_newline_does_not_end_a_sentence():
    """Hard-wrapped text (Project Gutenberg's 70 columns) keeps its sentences whole."""
    wrapped = "The carriage rolled along the road\nto Bath, and nobody spoke at all.\n\nThen it stopped."
    assert split_sentences(wrapped, min_words=1) == [
        "The carriage rolled along the road to Bath, and nobody spoke at all.", "Then it stopped."]


def test_curly_quotes_and_brackets_close_a_sentence():
    s = split_sentences("\u201cWhere is he?\u201d \u201cGone to town.\u201d (He left early.) Then silence fell.",
                        min_words=1)
    assert s == ["\u201cWhere is he?\u201d", "\u201cGone to town.\u201d", "(He left early.)", "Then silence fell."]


@pytest.mark.parametrize("min_words,expected", [(1, 3), (2, 2), (4, 1)])
def test_short_sentences_are_dropped_and_the_count_capped(min_words, expected):
    text = "Yes. Not now. She walked home in the rain."
    assert len(split_sentences(text, min_words=min_words)) == expected
    assert split_sentences(text * 5, min_words=1, max_sentences=4) == split_sentences(text * 5, min_words=1)[:4]


def test_calibration_and_eval_use_the_same_rule():
    from permcompile import evaluate

    assert data.split_sentences is split_sentences and evaluate.split_sentences is split_sentences
