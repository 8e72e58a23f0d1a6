"""Stop strings: earliest-completing match, spanning deltas, hold-back, include_stop_str_in_output."""

import random

import pytest

from jserve.stop_strings import StopMatch, StopStringMatcher, find_stop_string, partial_stop_suffix_len


def run(stop, deltas, include=False, final=True):
    """Feed deltas; return (emitted text, matched stop string, per-delta emissions)."""
    m = StopStringMatcher(stop, include)
    emitted = []
    for i, d in enumerate(deltas):
        r = m.feed(d, final=final and i == len(deltas) - 1)
        emitted.append(r.text)
        if r.stopped:
            return "".join(emitted), r.stop_str, emitted
    return "".join(emitted), None, emitted


def reference(text, stop, include):
    """Brute force: the shortest prefix of the text that contains a stop string decides."""
    for end in range(1, len(text) + 1):
        done = [s for s in stop if text[:end].endswith(s)]
        if done:
            s = max(done, key=len)
            return (text[:end] if include else text[:end - len(s)]), s
    return text, None


def test_no_stop_strings_pass_through():
    m = StopStringMatcher(())
    assert m.feed("abc") == StopMatch("abc") and m.feed("def", final=True) == StopMatch("def")


def test_stop_inside_one_delta():
    assert run(["STOP"], ["hello STOP world"])[:2] == ("hello ", "STOP")
    assert run(["STOP"], ["hello STOP world"], include=True)[:2] == ("hello STOP", "STOP")


def test_stop_spanning_two_deltas_is_held_back_then_dropped():
    m = StopStringMatcher(["\nUser:"])
    assert m.feed("The answer is 42.\nUs") == StopMatch("The answer is 42.")
    assert m.held_text == "\nUs"
    assert m.feed("er: and more") == StopMatch("", "\nUser:")
    assert m.stop_str == "\nUser:"


def test_held_text_released_when_it_does_not_complete():
    m = StopStringMatcher(["STOP"])
    assert m.feed("abc ST").text == "abc "
    assert m.feed("O").text == ""
    assert m.held_text == "STO"
    assert m.feed("NE and S").text == "STONE and "
    assert m.feed("", final=True) == StopMatch("S")  # the sequence ended: nothing is held any more


def test_include_stop_str_in_output_holds_nothing():
    m = StopStringMatcher(["STOP"], include_stop_str_in_output=True)
    assert m.feed("abc ST") == StopMatch("abc ST")
    assert m.feed("OP def") == StopMatch("OP", "STOP")


def test_stop_spanning_many_deltas():
    assert run(["<end>"], ["a<", "e", "n", "d", ">b"])[:2] == ("a", "<end>")
    assert run(["<end>"], ["a<", "e", "n", "d", ">b"], include=True)[:2] == ("a<end>", "<end>")


def test_earliest_completing_stop_wins():
    # "bc" completes before "abcd" does, whichever way the text is split.
    assert run(["abcd", "bc"], ["xabcd"])[:2] == ("xa", "bc")
    assert run(["abcd", "bc"], ["xa", "bcd"])[:2] == ("xa", "bc")
    # same end: the longer string (starting earlier) wins
    assert run(["b", "ab"], ["xab"])[:2] == ("x", "ab")
    assert run(["b", "ab"], ["xa", "b"])[:2] == ("x", "ab")


def test_text_after_stop_is_dropped():
    m = StopStringMatcher(["x"])
    text, hit = m.feed("axb")  # a StopMatch unpacks as (text, stop_str)
    assert (text, hit) == ("a", "x")
    assert m.feed("more") == StopMatch("", "x") and m.feed("", final=True).stopped


@pytest.mark.parametrize("bad", [[""], [None], ["ok", 3]])
def test_bad_stop_strings(bad):
    with pytest.raises(ValueError, match="non-empty strings"):
        StopStringMatcher(bad)


def test_helpers():
    assert find_stop_string("hello world", 5, ["o", "wor"]) == (7, "o")
    assert find_stop_string("hello world", 3, ["o"]) is None  # both "o"s are in already-checked text
    assert find_stop_string("hello world", 3, ["o", "wor"]) == (6, "wor")  # ends in the new text
    assert find_stop_string("hello world", 2, ["wor"]) is None
    assert find_stop_string("hello world", 3, ["wor"]) == (6, "wor")
    assert partial_stop_suffix_len("abc ST", ["STOP", "T!"]) == 2
    assert partial_stop_suffix_len("abc S", ["STOP", "T!"]) == 1
    assert partial_stop_suffix_len("abc STOP", ["STOP"]) == 0  # a whole stop string is a match, not a prefix
    assert partial_stop_suffix_len("abc", []) == 0


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_random_splits_match_reference(seed, include):
    rng = random.Random(seed)
    alphabet = "abc 😀你"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
    word = lambda: "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5)))
    stop = [word() for _ in range(rng.randrange(1, 4))]
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(0, 8))))
    deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    m = StopStringMatcher(stop, include)
    out, got_stop = [], None
    for i, d in enumerate(deltas):
        r = m.feed(d, final=i == len(deltas) - 1)
        out.append(r.text)
        if r.stopped:
            got_stop = r.stop_str
            break
        # anything held back really could still become a stop string
        assert m.held_text == "" or any(s.startswith(m.held_text) for s in stop)
        assert not include or m.held_text == ""
    assert ("".join(out), got_stop) == reference(text, stop, include)
