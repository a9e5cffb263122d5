"""The two hypothesis profiles every fuzz test uses: a quick one for CI, a long one outside it.

`long_run` marks a test `fuzz` (excluded from the default run, selected by
`pytest -m fuzz`), lifts the per-test timeout and asks for
CONTINUUM_FUZZ_EXAMPLES examples (default 100 000).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, settings

F = TypeVar("F", bound=Callable[..., object])

FUZZ_EXAMPLES = int(os.environ.get("CONTINUUM_FUZZ_EXAMPLES", "100000"))


def quick(examples: int) -> settings:
    """CI's profile; module-scoped targets (a live relay or oracle) are shared across examples."""
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def long_run(test: F) -> F:
    configured = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))(test)
    return pytest.mark.fuzz(pytest.mark.timeout(0)(configured))  # type: ignore[no-any-return]
