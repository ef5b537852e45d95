"""The prompt grammar: a table of valid prompts, every bad input with its position, and
property tests (render → parse round trip; random strings raise nothing but PromptError)."""
from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.grammar import Script, Segment, format_seconds, parse, render
from utils.errors import PromptError, UserError

DEFAULT = 5.0


def S(*segments: Segment) -> Script:
    return Script(tuple(segments))


VALID = [
    # every example of the seed README
    ("action_1_prompt[30s]", S(Segment("action_1_prompt", 30.0))),
    ("action_1_prompt[5s] | action_2_prompt[10s] | action_3_prompt[15s]",
     S(Segment("action_1_prompt", 5.0), Segment("action_2_prompt", 10.0),
       Segment("action_3_prompt", 15.0))),
    ("action_1_prompt[10s] | action_2_prompt[10s#] | action_3_prompt[10s#]",
     S(Segment("action_1_prompt", 10.0), Segment("action_2_prompt", 10.0, cut=True),
       Segment("action_3_prompt", 10.0, cut=True))),
    ("action_1[10s] | action_2[10s#] | action_3[10s#] ; subtitle_1 | subtitle_2 | subtitle_3",
     S(Segment("action_1", 10.0, False, "subtitle_1"), Segment("action_2", 10.0, True, "subtitle_2"),
       Segment("action_3", 10.0, True, "subtitle_3"))),
    # decimals, whitespace, default duration
    ("a fox runs[2.5s]", S(Segment("a fox runs", 2.5))),
    ("a fox runs[2.5 s]", S(Segment("a fox runs", 2.5))),
    ("a fox runs [ 0.75 s # ]  ", S(Segment("a fox runs", 0.75))),
    ("a[.5s] | b[3.s#]", S(Segment("a", 0.5), Segment("b", 3.0, cut=True))),
    ("a[+4s]", S(Segment("a", 4.0))),
    ("a fox runs", S(Segment("a fox runs", DEFAULT))),
    ("a|b[1s]|c", S(Segment("a", DEFAULT), Segment("b", 1.0), Segment("c", DEFAULT))),
    ("  spaced   text  [1s]", S(Segment("spaced   text", 1.0))),
    ("line one\nline two[1s]", S(Segment("line one\nline two", 1.0))),
    # subtitles: trimmed, empty slots, empty subtitle part
    ("a[1s] | b[1s] | c[1s] ; one |  | three ",
     S(Segment("a", 1.0, False, "one"), Segment("b", 1.0), Segment("c", 1.0, False, "three"))),
    ("a[1s] | b[1s] ;", S(Segment("a", 1.0), Segment("b", 1.0))),
    ("a[1s] | b[1s] ;  |  ", S(Segment("a", 1.0), Segment("b", 1.0))),
    ("a ; hello", S(Segment("a", DEFAULT, False, "hello"))),
    ("a ; see [1] #2", S(Segment("a", DEFAULT, False, "see [1] #2"))),
    # '#' outside brackets is text
    ("#1 fan waves[2s]", S(Segment("#1 fan waves", 2.0))),
    # escapes
    (r"rock \| roll[1s]", S(Segment("rock | roll", 1.0))),
    (r"a\;b \[x\] \#c[1s] ; sub\|title\;", S(Segment("a;b [x] #c", 1.0, False, "sub|title;"))),
    (r"back\\slash[1s]", S(Segment("back\\slash", 1.0))),
    (r"C:\temp\x[1s]", S(Segment("C:\\temp\\x", 1.0))),  # other backslashes are literal
    ("trailing\\", S(Segment("trailing\\", DEFAULT))),
]


@pytest.mark.parametrize("prompt,expected", VALID)
def test_valid_prompts(prompt, expected):
    assert parse(prompt, DEFAULT) == expected


def test_cut_on_first_segment_is_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.grammar"):
        script = parse("a[2s#] | b[2s#]", DEFAULT)
    assert script == S(Segment("a", 2.0), Segment("b", 2.0, cut=True))
    assert "first segment" in caplog.text


def test_cut_belongs_to_the_segment_that_carries_it():
    """README: '#' cuts at the start of its own segment (the reference parser would attach it
    to the previous boundary)."""
    script = parse("a[1s] | b[1s] | c[1s#] | d[1s]", DEFAULT)
    assert [s.cut for s in script.segments] == [False, False, True, False]


INVALID = [
    # (prompt, position, segment, words the message must contain)
    ("a[10m]", 4, 1, "unknown unit 'm'"),
    ("a | b[10 min]", 9, 2, "unknown unit 'min'"),
    ("a[0s]", 2, 1, "greater than zero"),
    ("a[0.0s]", 2, 1, "greater than zero"),
    ("a[1s] | b[-3s]", 10, 2, "greater than zero"),
    ("a[xs]", 2, 1, "not a duration"),
    ("a[1.2.3s]", 2, 1, "not a duration"),
    ("a[#5s]", 2, 1, "'#'"),
    ("a[]", 1, 1, "no duration"),
    ("a[#]", 1, 1, "no duration"),
    ("a[5]", 3, 1, "no unit"),
    ("a[1,5s]", 3, 1, "'1,5s' has a decimal comma; write a decimal point, e.g. [1.5s]"),
    ("a[1s] | b[2,25 s#]", 11, 2, "decimal comma; write a decimal point, e.g. [2.25s#]"),
    ("a[1,x]", 3, 1, "unknown unit ',x'"),
    ("a[" + "9" * 400 + "s]", 2, 1, "too large"),
    ("[5s]", 0, 1, "no action text"),
    ("a[1s] |   [5s#]", 10, 2, "no action text"),
    ("a[1s] | ", 6, 2, "no action text"),
    (" | a", 1, 1, "no action text"),
    ("a || b", 2, 2, "no action text"),  # the "|" that opens the empty segment
    ("a[5s", 1, 1, "never closed"),
    ("a[5s | b[1s]", 1, 1, "never closed"),
    ("a[5s ; x", 1, 1, "never closed"),
    ("a[5s] b", 6, 1, "after the closing"),
    ("a[5s][6s]", 5, 1, "after the closing"),
    ("a] b", 1, 1, "unexpected ']'"),
    ("a ; b ; c", 6, None, "more than one ';'"),
    ("a | b ; x", 6, None, "2 segment(s) but 1 subtitle(s)"),
    ("a ; x | y | z", 2, None, "1 segment(s) but 3 subtitle(s)"),
    ("", 0, None, "no action"),
    ("   \n ", 0, None, "no action"),
    (" ; just a subtitle", 0, None, "no action"),
    ("caf\udce9 au lait[5s]", 3, None, "not valid UTF-8"),  # Latin-1 bytes, as Python's argv keeps them
    ("a[1s] ; sub\ud800", 11, None, "not valid UTF-8"),  # a lone surrogate (a browser's JSON can send one)
]


@pytest.mark.parametrize("prompt,position,segment,words", INVALID)
def test_bad_prompts_give_prompt_error_with_position(prompt, position, segment, words):
    with pytest.raises(PromptError) as info:
        parse(prompt, DEFAULT)
    error = info.value
    assert isinstance(error, UserError)
    assert (error.position, error.segment) == (position, segment)
    message = str(error)
    assert words in message
    assert "\n" not in message
    assert f"position {position}" in message
    if segment is not None:
        assert f"segment {segment}" in message


def test_bad_default_duration_is_a_config_error():
    from utils.errors import ConfigError
    with pytest.raises(ConfigError, match="default_segment_seconds"):
        parse("a", 0)


@pytest.mark.parametrize("seconds,text", [(5.0, "5"), (2.5, "2.5"), (1e-05, "0.00001"),
                                          (1e16, "10000000000000000"), (0.1, "0.1")])
def test_format_seconds_is_positional_and_exact(seconds, text):
    assert format_seconds(seconds) == text
    assert float(text) == seconds


def test_render_of_seed_example():
    prompt = "action_1[10s] | action_2[10s#] | action_3[10s#] ; subtitle_1 | subtitle_2 | subtitle_3"
    assert render(parse(prompt, DEFAULT)) == prompt


# ---------------------------------------------------------------- property tests
SPECIALS = "\\|;[]# \n\t"
any_text = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(SPECIALS), max_size=20)
texts = any_text.map(str.strip).filter(bool)
seconds = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def scripts(draw):
    n = draw(st.integers(1, 5))
    with_subtitles = draw(st.booleans())
    segments = []
    for k in range(n):
        subtitle = draw(st.none() | texts) if with_subtitles else None
        segments.append(Segment(draw(texts), draw(seconds), k > 0 and draw(st.booleans()),
                                subtitle))
    return Script(tuple(segments))


@settings(max_examples=300, deadline=None)
@given(scripts())
def test_render_then_parse_round_trips(script):
    assert parse(render(script), DEFAULT) == script


def _parse_or_prompt_error(prompt: str) -> None:
    try:
        script = parse(prompt, DEFAULT)
    except PromptError as error:
        assert error.position is not None and 0 <= error.position <= len(prompt)
        assert "\n" not in str(error)
        return
    assert script.segments and all(s.text and s.seconds > 0 for s in script.segments)
    assert not script.segments[0].cut


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_random_text_raises_only_prompt_error(prompt):
    _parse_or_prompt_error(prompt)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab |;[]#s0123456789.\\ ", max_size=40))
def test_random_grammar_strings_raise_only_prompt_error(prompt):
    _parse_or_prompt_error(prompt)
