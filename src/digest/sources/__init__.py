"""Sources: one module per site. ``fetch()`` does network, ``parse()`` is pure."""
