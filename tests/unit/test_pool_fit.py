"""``pool_fit.largest_fitting``: the most pages that fit, found by few trial allocations."""

import pytest

from jserve.pool_fit import FIT_TOLERANCE, largest_fitting


def _room(pages: int, tried: list[int]):
    def fits(n: int) -> bool:
        tried.append(n)
        return n <= pages
    return fits


def test_the_search_finds_the_most_pages_that_fit_to_within_its_tolerance():
    tried: list[int] = []
    found = largest_fitting(_room(55_000, tried), 56_668, guess=54_454)
    assert 55_000 - 56_668 // FIT_TOLERANCE <= found <= 55_000
    assert tried[0] == 54_454 and len(tried) <= 8   # the guess fits: bisection above it


def test_a_guess_that_does_not_fit_steps_down_by_quarters():
    tried: list[int] = []
    assert largest_fitting(_room(40, tried), 100, guess=90) == 40   # 100 // 512 < 1: to the page
    assert tried[:3] == [90, 67, 50]


def test_no_guess_starts_at_three_quarters_and_candidates_follow_the_pool_rounding():
    tried: list[int] = []
    found = largest_fitting(_room(700, tried), 1000, guess=-5, round_pages=lambda n: n - n % 8)
    assert tried[0] == 744 and all(n % 8 == 0 for n in tried) and found == 696


def test_nothing_that_fits_is_an_error_naming_the_pages():
    with pytest.raises(MemoryError, match="100 pages did not"):
        largest_fitting(lambda n: False, 100, guess=80)
