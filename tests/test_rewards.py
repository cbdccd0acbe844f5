"""Built-in reward functions and loading one by dotted path."""

import pytest

from flux.rewards import char_match, exact_match, extract_answer, format_reward, load_function


@pytest.mark.parametrize("completion, answer", [
    ("<answer>321</answer>", "321"),
    ("think... <answer> 321 </answer>", "321"),
    ("<answer>1</answer> then <answer>2</answer>", "2"),   # the last tag wins
    ("  321\n", "321"),                                      # no tag: the whole completion
    ("<answer>a\nb</answer>", "a\nb"),                      # tags span lines
])
def test_extract_answer(completion, answer):
    assert extract_answer(completion) == answer


@pytest.mark.parametrize("completion, record, reward", [
    ("321", {"answer": "321"}, 1.0),
    (" 321 ", {"answer": "321\n"}, 1.0),
    ("<answer>42</answer>", {"answer": 42}, 1.0),           # non-string answers compare as text
    ("3210", {"answer": "321"}, 0.0),
    ("", {"answer": "321"}, 0.0),
    ("anything", {}, 0.0),
    ("", {}, 1.0),
])
def test_exact_match(completion, record, reward):
    assert exact_match(completion, record) == reward


@pytest.mark.parametrize("completion, answer, reward", [
    ("321", "321", 1.0),
    ("3x1", "321", 2 / 3),
    ("123", "321", 1 / 3),          # only the middle character is in place
    ("32", "321", 2 / 3),           # a missing character counts as wrong
    ("3219", "321", 3 / 4),         # so does an extra one
    ("", "321", 0.0),
    ("", "", 1.0),
    ("<answer>321</answer>", "321", 1.0),
])
def test_char_match(completion, answer, reward):
    assert char_match(completion, {"answer": answer}) == pytest.approx(reward)


def test_char_match_is_bounded_and_exact_only_when_equal():
    for got in ["", "1", "12", "123", "1234", "999", "3 2 1"]:
        r = char_match(got, {"answer": "123"})
        assert 0.0 <= r <= 1.0
        assert (r == 1.0) == (got == "123")


def test_format_reward():
    assert format_reward("reasoning <answer>3</answer>", {}) == 1.0
    assert format_reward("<answer>3</answer>\n  ", {}) == 1.0
    assert format_reward("<answer>3</answer> trailing words", {}) == 0.0
    assert format_reward("no tags", {}) == 0.0
    assert format_reward("ABC-12", {"format": r"[A-Z]+-\d+"}) == 1.0
    assert format_reward("ABC-12x", {"format": r"[A-Z]+-\d+"}) == 0.0


def test_load_function_finds_builtin_and_user_functions():
    assert load_function("flux.rewards:char_match") is char_match
    assert load_function("os.path:join")("a", "b") == "a/b"


@pytest.mark.parametrize("dotted, why", [
    ("flux.rewards.char_match", "expected `module:function`"),
    (":char_match", "expected `module:function`"),
    ("flux.rewards:", "expected `module:function`"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("flux.rewards:no_such_fn", "flux.rewards has no function no_such_fn"),
    ("flux.rewards:ANSWER_TAG", "flux.rewards has no function ANSWER_TAG"),  # exists, not callable
])
def test_load_function_errors_are_one_line_value_errors(dotted, why):
    with pytest.raises(ValueError) as e:
        load_function(dotted)
    assert why in str(e.value) and "\n" not in str(e.value)
