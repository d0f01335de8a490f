"""The app starts on a sample catalog and its pages carry the security headers."""

from fakes.web import make_client


def test_library_page_lists_the_sample_files(client, sample_library):
    import sqlite3

    r = client.get("/")
    assert r.status_code == 200
    n = sqlite3.connect(sample_library / "catalog.db").execute(
        "SELECT count(*) FROM files WHERE status = 'present'").fetchone()[0]
    assert n > 10
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"


def test_static_htmx_is_shipped(client):
    r = client.get("/static/htmx.min.js")
    assert r.status_code == 200 and b"htmx" in r.content[:200]


def test_non_loopback_without_token_is_refused_at_start(sample_library):
    import pytest

    from ckptlab.errors import UsageError

    with pytest.raises(UsageError):
        make_client(sample_library / "catalog.db", host="0.0.0.0")
