"""score_math (math-verify, last boxed), its thread safety, overlong shaping, arith verifier."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from espo_jax.rewards import (
    last_boxed, overlong_penalty, score_arith, score_math, score_math_batch)

# (response, gold, reward, gradable)
CASES = [
    (r"so the answer is \boxed{\frac43}.", "4/3", 1.0, True),
    (r"\boxed{\frac{4}{3}}", r"\frac43", 1.0, True),
    (r"\boxed{\sqrt2}", r"\sqrt{2}", 1.0, True),
    (r"\boxed{\dfrac{1}{2}}", "0.5", 1.0, True),
    (r"\boxed{\tfrac12}", r"\frac{1}{2}", 1.0, True),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0, True),
    (r"\boxed{90^\circ}", "90", 1.0, True),
    (r"\boxed{90^{\circ}}", r"90^\circ", 1.0, True),
    (r"\boxed{5\text{ cm}}", "5", 1.0, True),
    (r"\boxed{\left(1,2\right)}", "(1,2)", 1.0, True),
    (r"\boxed{ 3. }", "3", 1.0, True),
    (r"\boxed{12}.", "12", 1.0, True),
    (r"\boxed{1\,000}", "1000", 1.0, True),
    (r"\boxed{10\%}", "10", 1.0, True),
    (r"\boxed{x=3}", "3", 1.0, True),
    (r"\boxed{\pi}", r"\pi", 1.0, True),
    (r"\fbox{7}", "7", 1.0, True),
    (r"\boxed 5", "5", 1.0, True),
    (r"$\boxed{4}$", r"\boxed{4}", 1.0, True),
    (r"\boxed{\text{(C)}}", r"\text{(C)}", 1.0, True),
    (r"\boxed{{1}+{2}}", "3", 1.0, True),  # nested braces
    (r"\boxed{\frac{2}{\frac{1}{2}}}", "4", 1.0, True),
    (r"first \boxed{1}, finally \boxed{2}", "2", 1.0, True),  # last box counts
    (r"first \boxed{2}, finally \boxed{1}", "2", 0.0, True),
    (r"\boxed{3.14}", r"\pi", 0.0, True),
    (r"\boxed{5}", "6", 0.0, True),
    (r"\boxed{\frac{3}{4}}", "4/3", 0.0, True),
    (r"the answer is 5", "5", 0.0, False),  # no box
    (r"\boxed{}", "1", 0.0, False),
    (r"\boxed{1/2", "1/2", 0.0, False),  # unclosed box
    ("", "1", 0.0, False),
]


@pytest.mark.parametrize("response,gold,reward,gradable", CASES)
def test_score_math_table(response, gold, reward, gradable):
    assert score_math(response, gold) == (reward, gradable)


def test_last_boxed_balanced_braces():
    assert last_boxed(r"a \boxed{\frac{1}{2}} b \boxed{x^{2}}") == "x^{2}"
    assert last_boxed(r"\boxed{a} \boxed{b") == "a"
    assert last_boxed("no box") is None


def test_score_math_thread_safe():
    responses = [c[0] for c in CASES] * 4
    golds = [c[1] for c in CASES] * 4
    expected = [(c[2], c[3]) for c in CASES] * 4
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(score_math, responses, golds))
    assert got == expected


def test_score_math_batch_sequential():
    rewards, gradable = score_math_batch([c[0] for c in CASES], [c[1] for c in CASES])
    assert rewards == [c[2] for c in CASES] and gradable == [c[3] for c in CASES]
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        score_math_batch(["a", "b"], ["1"])


@pytest.mark.slow
def test_score_math_batch_process_pool():
    cases = CASES[:8]
    rewards, gradable = score_math_batch([c[0] for c in cases], [c[1] for c in cases],
                                         num_workers=1)
    assert rewards == [c[2] for c in cases] and gradable == [c[3] for c in cases]


def test_overlong_penalty_values():
    # max_len 100, buffer 20: free up to 80, linear to -penalty at 100, held there beyond.
    pen = overlong_penalty([10, 80, 85, 90, 100, 120], max_len=100, buffer=20, penalty=1.0)
    np.testing.assert_allclose(pen, [0, 0, -0.25, -0.5, -1.0, -1.0])
    assert pen.dtype == np.float32
    np.testing.assert_allclose(overlong_penalty([90], 100, 20, penalty=0.5), [-0.25])
    np.testing.assert_allclose(overlong_penalty([100, 101], 100, 0), [0, -1])
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty([1], max_len=10, buffer=20)


def test_score_arith():
    assert score_arith("37+48=85;85-19=66;#66", "66") == (1.0, True)
    assert score_arith("37+48=85;#85", "66") == (0.0, True)
    assert score_arith("#66#12", "66") == (1.0, True)  # the first answer counts
    assert score_arith("37+48=85;85-19=66;", "66") == (0.0, False)
    assert score_arith("#", "66") == (0.0, False)
