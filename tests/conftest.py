"""Shared pytest fixtures.

``no_leaked_slots`` (autouse) fails any test that leaves a ``BufferPool`` slot leased, or whose
leases were only returned by the garbage collector instead of ``release()``. It runs
``gc.collect()`` first when some slot is out, so generators the test abandoned are finalized
(their ``finally`` and ``with`` blocks run) before the pools are checked.
"""

from __future__ import annotations

import pytest

from micro_expert_router.io import leak_report


@pytest.fixture(autouse=True)
def no_leaked_slots():
    yield
    leaks = leak_report()
    if leaks:
        pytest.fail("test leaked buffer-pool slots:\n  " + "\n  ".join(leaks), pytrace=False)
