"""Final answers of real datasets: extracted from a reference or a completion, normalised, compared.

Two formats, each with its reward (`tasks.REWARDS`):

- ``gsm8k``: GSM8K's solutions end with ``#### <number>``. A completion's answer is the first
  number after its last ``####``, else its last number. Numbers are compared as decimals
  after dropping thousands commas, ``$``, ``%``, a trailing ``.`` and words after them
  (``#### 1,200 dollars`` is 1200, ``18.00`` is 18).
- ``boxed``: MATH's solutions put the answer in ``\\boxed{...}``. The last ``\\boxed{}`` (or
  ``\\fbox{}``, or ``\\boxed 5``) of a completion is compared with the reference's after the
  normalisation of MATH's own grader (Hendrycks et al.'s ``is_equiv``): ``\\left``/``\\right``,
  spaces, ``\\!`` and thin spaces, ``$``, ``^\\circ``, ``\\%``, trailing units ``\\text{ cm}`` and
  ``.`` dropped, ``dfrac``/``tfrac`` -> ``frac``, ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt3`` ->
  ``\\sqrt{3}``, ``0.5`` -> ``\\frac{1}{2}``, a short ``x=`` prefix dropped. Two answers that
  are plain numbers (integers, decimals, ``\\frac{a}{b}``, ``a/b``) are compared as fractions.

Why not HF's ``math-verify``, which also proves symbolic equivalences (``(x+1)^2`` and
``x^2+2x+1``): it bounds its sympy work with ``signal.alarm``, which only works in a process's
main thread, and Ray Train runs the learner's loop (where rewards are computed) in a worker
thread. Without the alarm a completion such as ``\\boxed{9^{9^{9^9}}}`` against ``\\boxed{2}``
did not finish in 120 s. The string rules here cannot hang; the tests check them against
``math-verify`` on the cases where both should agree.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

# A number: thousands groups (1,234,567.5) or plain digits, optionally signed or decimal.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def _number(text: str) -> str | None:
    """The canonical form of the number ``text`` (``1,200.50`` -> ``1200.5``), else None."""
    try:
        d = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    # normalize() gives 1.2E+3 for 1200; the integral value prints in full.
    return str(int(d)) if d == d.to_integral_value() else format(d.normalize(), "f")


def gsm8k_reference(solution: str) -> str | None:
    """The number after the last ``####`` of a GSM8K solution, canonical; None without one."""
    if "####" not in solution:
        return None
    m = _NUMBER.search(solution.rsplit("####", 1)[1].replace("$", ""))
    return _number(m.group()) if m else None


def gsm8k_answer(completion: str) -> str | None:
    """A completion's answer: the first number after its last ``####``, else its last number."""
    text = completion.replace("$", "")
    if "####" in text:
        m = _NUMBER.search(text.rsplit("####", 1)[1])
        return _number(m.group()) if m else None
    found = _NUMBER.findall(text)
    return _number(found[-1]) if found else None


def last_number(text: str) -> str | None:
    """The last number in ``text``, canonical; None without one."""
    found = _NUMBER.findall(text)
    return _number(found[-1]) if found else None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (braces balanced), or of
    ``\\boxed X`` (up to the next ``$`` or whitespace); None when there is none or it is unclosed."""
    starts = list(re.finditer(r"\\(?:boxed|fbox)", text))
    if not starts:
        return None
    i = starts[-1].end()
    spaced = i
    while i < len(text) and text[i] == " ":
        i += 1
    if text[i:i + 1] != "{":
        if i == spaced:  # "\boxed5" or the end of the text
            return None
        return re.split(r"[\s$]", text[i:], maxsplit=1)[0] or None  # "\boxed 5": no braces
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def _fix_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}, \frac{1}2 -> \frac{1}{2}
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            if part.startswith("{"):
                close = _closing(part, 0)
                if close is not None and close + 1 < len(part) and part[close + 1] != "{":
                    part = part[: close + 1] + "{" + part[close + 1] + "}" + part[close + 2 :]
            out += part
            continue
        a, rest = part[0], part[1:]
        if rest.startswith("{"):
            out += "{" + a + "}" + rest
        else:
            out += "{" + a + "}{" + rest[0] + "}" + rest[1:]
    return out


def _closing(s: str, i: int) -> int | None:
    """Index of the brace closing the one at ``s[i]``."""
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return j
    return None


def _fix_sqrt(s: str) -> str:
    # \sqrt3 -> \sqrt{3}, \sqrt x -> \sqrt{x}
    return re.sub(r"\\sqrt\s*([^{\s\\])", r"\\sqrt{\1}", s)


def _slash_to_frac(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def normalize_math(answer: str) -> str:
    """``answer`` (LaTeX) in the canonical form of MATH's grader; see the module docstring."""
    s = answer.replace("\n", "")
    s = re.sub(r"\\[!,;:]|\\ ", "", s)  # \! and the thin spaces
    s = s.replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    # Units at the end: "5\text{ cm}" (MATH writes units with a space inside \text, \mbox).
    s = re.sub(r"\\(?:text|mbox|mathrm)\{\s[^{}]*\}\s*$", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\\(?:text|mbox|mathrm|textbf)\{([^{}]*)\}", r"\1", s)  # \text{(C)} -> (C)
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    s = s.strip()
    if s.startswith("."):
        s = "0" + s
    # "x = 5" and "k=2": the value (only for a short name, not "a+b=5").
    head, eq, tail = s.partition("=")
    if eq and len(head.strip()) <= 2 and "=" not in tail:
        s = tail
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    s = s.rstrip(".")
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_to_frac(s)


def _as_fraction(s: str) -> Fraction | None:
    """A normalised answer that is a plain number, exactly; None for anything else (no
    evaluation of powers or functions, so nothing can blow up)."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        return None if den == 0 else (-1 if m.group(1) else 1) * Fraction(num, den)
    n = _number(s) if re.fullmatch(r"-?[\d,]*\.?\d+", s) else None
    return Fraction(Decimal(n)) if n is not None else None


def math_equal(predicted: str, reference: str) -> bool:
    """Whether two boxed answers agree after normalisation (as numbers when both are numbers)."""
    a, b = normalize_math(predicted), normalize_math(reference)
    if a == b:
        return True
    fa, fb = _as_fraction(a), _as_fraction(b)
    return fa is not None and fa == fb


def gsm8k_equal(completion: str, reference: str) -> bool:
    """Whether a completion's GSM8K answer is the (canonical) reference number."""
    predicted, expected = gsm8k_answer(completion), _number(reference.strip())
    return predicted is not None and expected is not None and Decimal(predicted) == Decimal(expected)


def boxed_equal(completion: str, reference: str) -> bool:
    """Whether a completion's last boxed answer equals the reference (a boxed content)."""
    predicted = last_boxed(completion)
    return predicted is not None and math_equal(predicted, reference)
