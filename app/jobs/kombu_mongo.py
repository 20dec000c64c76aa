"""kombu's MongoDB transport, closing the MongoClient of each channel it closes.

kombu opens one MongoClient per channel and never closes it: every reconnection (a
broker step-down, a failed publish retried by Celery) leaks a client with its monitor
threads and sockets, for the life of the process. This subclass closes the client with
its channel; everything else is kombu's.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import mongodb


class Channel(mongodb.Channel):
    def close(self) -> None:
        database: Any = self.__dict__.get("client")  # kombu caches it once opened
        try:
            super().close()
        finally:
            if database is not None:
                database.client.close()


class Transport(mongodb.Transport):
    Channel = Channel
