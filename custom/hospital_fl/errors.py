"""One error type for bad input: it names the input, the value, the rule and the fix."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Raised when user-supplied input breaks a rule.

    The message always reads: ``<input>: got <value>; <rule>. Fix: <fix>``.
    """

    def __init__(self, name: str, value: object, rule: str, fix: str):
        self.name, self.value, self.rule, self.fix = name, value, rule, fix
        super().__init__(f"{name}: got {value!r}; {rule}. Fix: {fix}")
