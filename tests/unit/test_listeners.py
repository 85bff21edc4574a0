from serving.listeners import is_loopback


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "[::]", "192.0.2.2", "10.0.0.1", "example.com"):
        assert not is_loopback(host), host
