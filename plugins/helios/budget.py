"""A job's token budget, shared by its experts.

Each expert call reserves ``prompt estimate + completion cap`` before it starts; a call
whose reservation does not fit in what is left is not started. When the call returns,
the reservation is settled to what the provider reported (the rest goes back). Reserving
and settling never await, so experts running concurrently on one event loop cannot
overdraw the budget between a check and a reservation.
"""

from __future__ import annotations

__all__ = ["TokenBudget", "estimate_tokens"]


def estimate_tokens(*texts: str) -> int:
    """An upper-leaning estimate of the prompt tokens of ``texts``: about four characters
    per token for BPE tokenizers on English, at least one per word."""
    chars = sum(len(t) for t in texts)
    words = sum(len(t.split()) for t in texts)
    return max(words, -(-chars // 4))


class TokenBudget:
    """``total`` tokens; :meth:`reserve` before a call, :meth:`settle` after it."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.reserved = 0
        self.spent = 0
        # expert → tokens charged to it so far (its prompt while its call runs)
        self.charged: dict[str, int] = {}

    @property
    def left(self) -> int:
        """Tokens neither spent nor reserved."""
        return self.total - self.spent - self.reserved

    def reserve(self, prompt: int, completion_cap: int, min_completion: int) -> int | None:
        """Reserve ``prompt`` plus up to ``completion_cap`` tokens.

        Returns the completion tokens granted (at least ``min_completion``), or None when
        the budget cannot cover ``prompt + min_completion`` (nothing is reserved then).
        """
        grant = min(completion_cap, self.left - prompt)
        if grant < min_completion:
            return None
        self.reserved += prompt + grant
        return grant

    def settle(self, reserved: int, spent: int) -> None:
        """Release a reservation of ``reserved`` tokens and charge ``spent`` of them."""
        self.reserved -= reserved
        self.spent += spent
