"""Delivery: turning approved drafts into messages handed to an email provider.

``mime`` builds standards-correct messages; ``providers`` holds one module per provider
behind :class:`digest.delivery.providers.base.Provider`; ``sender`` (batching, rate limit,
retries and the send ledger) drives them.
"""
