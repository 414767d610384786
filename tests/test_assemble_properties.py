"""Property-based tests (hypothesis) of the completion check over series assembly: any even
stack in any order and any of the three orientations passes, the same stack with one interior
slice missing is refused as gapped, and no input geometry makes the check raise."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from dicomnode.node.assemble import content_check

ORIENTATIONS = {
    "axial": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
    "coronal": [1.0, 0.0, 0.0, 0.0, 0.0, -1.0],
    "sagittal": [0.0, 1.0, 0.0, 0.0, 0.0, -1.0],
}


def _stack(n: int, spacing: float, start: float, orientation: list[float]) -> list[list[float]]:
    row, col = orientation[:3], orientation[3:]
    normal = [row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2],
              row[0] * col[1] - row[1] * col[0]]
    return [[(start + k * spacing) * c for c in normal] for k in range(n)]


stacks = st.tuples(
    st.integers(min_value=3, max_value=300),
    st.floats(min_value=0.1, max_value=10.0),
    st.floats(min_value=-1000.0, max_value=1000.0),
    st.sampled_from(sorted(ORIENTATIONS)),
    st.randoms(use_true_random=False),
)


@settings(max_examples=300, deadline=None)
@given(stacks)
def test_an_even_stack_in_any_order_passes(case) -> None:  # type: ignore[no-untyped-def]
    n, spacing, start, name, rnd = case
    positions = _stack(n, spacing, start, ORIENTATIONS[name])
    rnd.shuffle(positions)
    assert content_check(positions, [ORIENTATIONS[name]] * n, n) is None


@settings(max_examples=300, deadline=None)
@given(stacks, st.data())
def test_a_missing_interior_slice_is_refused_as_a_gap(case, data) -> None:  # type: ignore[no-untyped-def]
    n, spacing, start, name, rnd = case
    # (from 3 slices, one missing leaves 2 evenly spaced ones: only a count can tell, below)
    n = max(n, 5)
    positions = _stack(n, spacing, start, ORIENTATIONS[name])
    del positions[data.draw(st.integers(min_value=1, max_value=n - 2))]
    rnd.shuffle(positions)
    problem = content_check(positions, [ORIENTATIONS[name]] * (n - 1), None)
    assert problem is not None and "gapped" in problem
    # and a count short of ImagesInAcquisition is refused before any geometry
    assert content_check(positions, [ORIENTATIONS[name]] * (n - 1), n) == \
        f"{n - 1} of {n} expected instances"


finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
maybe_vec = st.one_of(st.none(), st.lists(finite, min_size=3, max_size=3))
maybe_orient = st.one_of(st.none(), st.lists(finite, min_size=6, max_size=6),
                         st.sampled_from(list(ORIENTATIONS.values())))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(maybe_vec, maybe_orient), max_size=40),
       st.one_of(st.none(), st.integers(min_value=0, max_value=100)))
def test_any_geometry_gets_a_decision_never_an_exception(rows, expected) -> None:  # type: ignore[no-untyped-def]
    positions = [p for p, _ in rows]
    orientations = [o for _, o in rows]
    problem = content_check(positions, orientations, expected)
    assert problem is None or (isinstance(problem, str) and problem)
    assert math.isfinite(len(problem or ""))
