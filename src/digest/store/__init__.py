"""All SQL lives here: tables (``schema``), engines and migrations (``db``), queries (``Store``)."""

from digest.store.store import Store, open_store

__all__ = ["Store", "open_store"]
