"""Per-connection flood control."""

import time


class RateLimiter:
    """A token bucket with strikes: over-limit frames are refused, and `max_strikes` refused
    frames in a row mean the client is not slowing down and must be disconnected."""

    __slots__ = ("burst", "max_strikes", "rate", "stamp", "strikes", "tokens")

    def __init__(self, *, rate: float, burst: float, max_strikes: int) -> None:
        self.rate = rate
        self.burst = burst
        self.max_strikes = max_strikes
        self.tokens = burst
        self.strikes = 0
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        """Take a token for one frame; False if the client is over the limit."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.strikes = 0
            return True
        self.strikes += 1
        return False

    @property
    def exhausted(self) -> bool:
        """The client ignored enough refusals that it should be disconnected."""
        return self.strikes >= self.max_strikes
