from ckptlab.library.catalog import Catalog


def test_open(pg_url):
    with Catalog(pg_url) as cat:
        assert cat.schema_version == 2
        print(cat.counts())
