"""Failed sign-ins per address: free attempts, doubling holds, then a block until the window ends."""

from __future__ import annotations

from server.auth.throttle import FailureThrottle
from server.config import FailedLoginSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_holds_double_then_the_address_is_blocked_until_its_window_ends() -> None:
    clock = Clock()
    settings = FailedLoginSettings(free_attempts=2, max_delay_s=1.0, block_after=6, window_s=60)
    throttle = FailureThrottle(settings, clock)
    delays = []
    for _ in range(6):
        throttle.attempt("10.0.0.1")
        delays.append(throttle.delay("10.0.0.1"))
    assert delays == [0, 0, 0.25, 0.5, 1.0, 1.0]
    assert throttle.blocked_for("10.0.0.1") == 60
    assert throttle.blocked_for("10.0.0.2") == 0  # others are not affected
    clock.now += 59
    assert throttle.blocked_for("10.0.0.1") == 1
    clock.now += 1
    assert throttle.blocked_for("10.0.0.1") == 0
    throttle.attempt("10.0.0.1")
    assert throttle.delay("10.0.0.1") == 0  # a fresh window


def test_the_table_is_bounded() -> None:
    throttle = FailureThrottle(FailedLoginSettings(tracked_addresses=100, free_attempts=1), Clock())
    for address in range(1000):
        throttle.attempt(f"10.0.{address // 256}.{address % 256}")
    assert len(throttle._windows) == 100


def test_attempts_in_flight_count_until_they_succeed() -> None:
    # Checked in parallel, a thousand guesses must not all get in before the first ones are counted.
    throttle = FailureThrottle(FailedLoginSettings(block_after=3), Clock())
    admitted = 0
    for _ in range(1000):
        if throttle.blocked_for("10.0.0.1") == 0:
            throttle.attempt("10.0.0.1")
            admitted += 1
    assert admitted == 3
    throttle.succeeded("10.0.0.1")
    assert throttle.blocked_for("10.0.0.1") == 0  # a good one gives its slot back


def test_ipv6_addresses_count_per_64() -> None:
    throttle = FailureThrottle(FailedLoginSettings(block_after=2), Clock())
    throttle.attempt("2001:db8:1:2::1")
    throttle.attempt("2001:db8:1:2:ffff::9")
    assert throttle.blocked_for("2001:db8:1:2::77") > 0
    assert throttle.blocked_for("2001:db8:1:3::1") == 0
