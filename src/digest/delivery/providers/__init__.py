"""One module per email provider, each behind :class:`~digest.delivery.providers.base.Provider`.

A provider takes a batch of :class:`~digest.types.OutgoingMessage`, makes exactly one call to
the provider and returns one :class:`~digest.types.SendResult` per message, or raises a
:class:`~digest.errors.DeliveryError` for the whole call. ``registry`` maps the
``delivery.provider`` name to its class and imports it only when used.
"""
