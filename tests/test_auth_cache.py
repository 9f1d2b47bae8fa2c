from mailpool.auth_cache import AuthCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_only_the_verified_password_matches_within_ttl_and_hash() -> None:
    clock = Clock()
    cache = AuthCache(ttl=60, clock=clock)
    assert not cache.check("bob", "secret", "h1")  # nothing verified yet
    cache.remember("bob", "secret", "h1")
    assert cache.check("bob", "secret", "h1")
    assert not cache.check("bob", "wrong", "h1")
    assert not cache.check("alice", "secret", "h1")
    assert not cache.check("bob", "secret", "h2")  # password changed: entry dropped
    assert not cache.check("bob", "secret", "h1")
    cache.remember("bob", "secret", "h1")
    clock.now += 61
    assert not cache.check("bob", "secret", "h1")  # expired


def test_ttl_zero_disables_and_no_password_is_kept() -> None:
    cache = AuthCache(ttl=0)
    cache.remember("bob", "secret", "h1")
    assert not cache.check("bob", "secret", "h1")
    cache = AuthCache(ttl=60)
    cache.remember("bob", "secret", "h1")
    assert b"secret" not in repr(cache.__dict__).encode()
