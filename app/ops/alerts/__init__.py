"""Alerts: channels (webhook, email), rules, alerts deduplicated in MongoDB, delivery as
durable jobs. See ``engine`` for the rules and the delivery guarantees, ``channels`` for
the channel definitions."""
