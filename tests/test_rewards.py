"""rewards.py on tables of cases."""

import pytest

import rewards

EX = {"answer": "left", "choices": ["left", "right"]}


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("</think><answer>left</answer>", 1.0),
        (
            " first I look.\nThen I check.\n</think>\n<answer> left </answer>",
            1.0,
        ),  # multi-line think, spaces
        ("</think> <answer>left</answer>", 1.0),
        ("</think><answer>left</answer> and more", 0.0),  # trailing text
        ("</think><answer>left</answer>\n", 0.0),  # even a newline after </answer>
        ("</think> left", 0.0),  # no answer tags
        ("<answer>left</answer>", 0.0),  # think never closed
        ("</think><answer>left", 0.0),  # answer never closed
        ("", 0.0),
        ("</think><answer>a</answer><answer>b</answer>", 1.0),  # the paper's regex allows it
    ],
)
def test_format_reward(completion, expected):
    assert rewards.format_reward(completion, EX) == expected


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("</think><answer>left</answer>", 1.0),
        ("a\nb</think>\n<answer>\n left \n</answer>", 1.0),  # multi-line, stripped
        ("</think><answer>Left</answer>", 0.0),  # exact match, case matters
        ("</think><answer>left</answer><answer>right</answer>", 1.0),  # the FIRST answer counts
        ("</think><answer>right</answer><answer>left</answer>", 0.0),
        ("left", 1.0),  # no tags: the whole completion
        ("  left \n", 1.0),
        ("I think left", 0.0),
        ("<answer>left", 0.0),  # unclosed: whole text compared
        ("</think><answer>the left one</answer>", 0.0),
    ],
)
def test_accuracy_reward(completion, expected):
    assert rewards.accuracy_reward(completion, EX) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Wait, the red one is bigger.", True), ("Let me re-check the positions.", True),
        ("But I should reconsider this.", True), ("On second thought it is left.", True),
        ("The waiter is left of the table.", False),  # whole words only
        ("It is on the left.", False),
    ],
)
def test_reflection_phrases(text, expected):
    assert rewards.is_reflective(text) is expected


def test_score_completions_weights_parts_and_counts_errors():
    def broken(completion, example):
        raise RuntimeError("boom")

    def nan_reward(completion, example):
        return float("nan")

    funcs = {
        "format": rewards.format_reward, "accuracy": rewards.accuracy_reward, "broken": broken,
        "nan": nan_reward,
    }
    weights = {"format": 0.5, "accuracy": 2.0, "broken": 1.0, "nan": 1.0}
    total, parts, errors = rewards.score_completions(
        ["</think><answer>left</answer>", "</think><answer>right</answer>", "left"], [EX] * 3,
        funcs, weights,
    )
    assert total == [2.5, 0.5, 2.0]
    assert parts["format"] == [1.0, 1.0, 0.0] and parts["accuracy"] == [1.0, 0.0, 1.0]
    assert parts["broken"] == [0.0, 0.0, 0.0] and errors == {
        "format": 0, "accuracy": 0, "broken": 3, "nan": 3,
    }


def test_load_reward_by_name_and_from_a_file(tmp_path):
    assert rewards.load_reward("accuracy") == ("accuracy", rewards.accuracy_reward)
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def short(completion, example):\n    return 1.0 if len(completion) < 5 else 0.0\n"
    )
    name, func = rewards.load_reward(f"{path}:short")
    assert name == "short" and func("abc", EX) == 1.0 and func("abcdef", EX) == 0.0


@pytest.mark.parametrize(
    "spec,message",
    [("acuracy", "unknown reward 'acuracy'"), ("missing_file.py:f", "does not exist")],
)
def test_load_reward_errors_name_the_flag(spec, message):
    with pytest.raises(ValueError, match="--reward_funcs") as info:
        rewards.load_reward(spec)
    assert message in str(info.value)


def test_load_reward_missing_function(tmp_path):
    path = tmp_path / "r.py"
    path.write_text("x = 1\n")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        rewards.load_reward(f"{path}:nope")
