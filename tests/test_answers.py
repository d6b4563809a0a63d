"""The rewards of real datasets on hand-made completions: GSM8K's `####` answer and MATH's
`\\boxed{}`, with their normalisation; the MATH rules checked against HF's math-verify."""

from __future__ import annotations

import pytest

from rlsparsity.platform import answers
from rlsparsity.platform.tasks import REWARDS

# (completion, reference, reward): the reference as GSM8K's extraction leaves it.
GSM8K_CASES = [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7", 1.0),
    ("#### 1,200", "1200", 1.0),  # thousands commas
    ("The total is $1,200.\n#### $1,200", "1200", 1.0),  # dollars
    ("#### 18.00", "18", 1.0),  # trailing zeros
    ("#### 18.", "18", 1.0),  # a sentence's full stop
    ("#### 42 dollars", "42", 1.0),  # units after the number
    ("#### -5", "-5", 1.0),
    ("#### 0.5", "0.5", 1.0),
    ("So 6 * 7 = 42. The answer is 42.", "42", 1.0),  # no ####: the last number
    ("#### 42\n#### 43", "42", 0.0),  # the last #### counts
    ("#### 41", "42", 0.0),
    ("I think it is 42, or maybe 43", "42", 0.0),
    ("no answer at all", "42", 0.0),
    ("####", "42", 0.0),
    ("#### 420", "42", 0.0),
    ("#### 4.2", "42", 0.0),
    ("#### 7<eos>#### 8", "7", 1.0),  # cut at the embedded model's EOS text
]


@pytest.mark.parametrize(("completion", "reference", "expected"), GSM8K_CASES)
def test_gsm8k_reward(completion: str, reference: str, expected: float) -> None:
    assert REWARDS["gsm8k"](completion, reference) == expected


@pytest.mark.parametrize(
    ("solution", "reference"),
    [("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"), ("#### 1,000,000", "1000000"),
     ("x\n#### -3", "-3"), ("#### 2.50", "2.5"), ("#### $5", "5"), ("no marker 5", None), ("#### none", None)],
)
def test_gsm8k_reference(solution: str, reference: str | None) -> None:
    assert answers.gsm8k_reference(solution) == reference


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        (r"so $\boxed{5}$.", "5"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"first \boxed{1}, then \boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),  # the last one
        (r"\fbox{7}", "7"),
        (r"\boxed 5$ and more", "5"),  # the no-brace form
        (r"\boxed {x+1}", "x+1"),
        (r"\boxed{\text{(C)}}", r"\text{(C)}"),
        (r"\boxed{unclosed", None),
        ("no box here: 5", None),
        (r"\boxed", None),
    ],
)
def test_last_boxed(text: str, boxed: str | None) -> None:
    assert answers.last_boxed(text) == boxed


# (completion, reference as MATH's \boxed{} holds it, reward): each is also what math-verify says.
MATH_CASES = [
    (r"The answer is $\boxed{\dfrac{1}{2}}$.", r"\frac{1}{2}", 1.0),  # dfrac -> frac
    (r"$\boxed{\tfrac12}$", r"\frac{1}{2}", 1.0),  # tfrac, braces added
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", 1.0),  # equal as numbers
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    (r"\boxed{(3,\frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),  # \left \right and spaces
    (r"\boxed{30^\circ}", "30", 1.0),
    (r"\boxed{30^{\circ}}", "30^\\circ", 1.0),
    (r"\boxed{10\%}", "10", 1.0),
    (r"\boxed{\$18.90}", "18.90", 1.0),
    (r"\boxed{5\text{ cm}}", "5", 1.0),  # trailing units
    (r"\boxed{x = 5}", "5", 1.0),
    (r"\boxed{\sqrt3}", r"\sqrt{3}", 1.0),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", 1.0),
    (r"\boxed{3\!\cdot\!4}", r"3\cdot4", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{-\frac{1}{3}}", r"-\frac{1}{3}", 1.0),
    (r"\boxed{3}", "4", 0.0),
    (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", 0.0),
    (r"\boxed{\sqrt{2}}", r"\sqrt{3}", 0.0),
    (r"\boxed{(1,2)}", "(2,1)", 0.0),
]
# Where the rules here differ from math-verify's on purpose.
OWN_RULES = [
    (r"\boxed{12.}", "12", 1.0),  # a trailing full stop is dropped (math-verify reads "12." as text)
    ("The answer is 5.", "5", 0.0),  # no box, no answer: the prompt asks for \boxed{} (math-verify takes the last number)
]


@pytest.mark.parametrize(("completion", "reference", "expected"), MATH_CASES + OWN_RULES)
def test_boxed_reward(completion: str, reference: str, expected: float) -> None:
    assert REWARDS["boxed"](completion, reference) == expected


@pytest.mark.parametrize(("completion", "reference", "expected"), MATH_CASES)
def test_boxed_reward_agrees_with_math_verify(completion: str, reference: str, expected: float) -> None:
    """The independent reference: HF's math-verify (symbolic, with its own LaTeX parser)."""
    from math_verify import parse, verify

    gold, pred = parse(f"$\\boxed{{{reference}}}$"), parse(completion)
    assert float(bool(pred) and verify(gold, pred)) == expected


@pytest.mark.parametrize(
    ("completion", "reference"),
    [(r"\boxed{(x+1)^2}", "x^2+2x+1"), (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}")],
)
def test_boxed_reward_is_stricter_than_math_verify_on_algebra(completion: str, reference: str) -> None:
    """The known gap: equivalences that need algebra score 0 here (math-verify proves them,
    but only with signal.alarm timeouts, which a learner's thread cannot use)."""
    from math_verify import parse, verify

    assert verify(parse(f"$\\boxed{{{reference}}}$"), parse(completion))
    assert REWARDS["boxed"](completion, reference) == 0.0


def test_boxed_reward_does_not_evaluate_towers() -> None:
    # math-verify without its alarm did not finish this comparison in 120 s.
    assert REWARDS["boxed"](r"\boxed{9^{9^{9^9}}}", "2") == 0.0
    assert REWARDS["boxed"](r"\boxed{9^{9^{9^9}}}", "9^{9^{9^9}}") == 1.0
