"""Counts the adversarial suite reports at the end of a run (issue: bad input never wins).

Tests add to these as they go; `pytest_terminal_summary` in conftest prints
them, so a run states how many hostile inputs it tried, how many attacks the
relay refused, how many crashes it survived and how many messages were lost.
"""

from __future__ import annotations

from collections import Counter

TALLY: Counter[str] = Counter()

INPUTS_TRIED = "hostile inputs tried"
ATTACKS_REJECTED = "attacks rejected"
FAULTS_SURVIVED = "faults survived"
MESSAGES_LOST = "messages lost"


def summary_lines() -> list[str]:
    TALLY.setdefault(MESSAGES_LOST, 0)
    return [f"{name}: {TALLY[name]}" for name in
            (INPUTS_TRIED, ATTACKS_REJECTED, FAULTS_SURVIVED, MESSAGES_LOST) if name in TALLY]
