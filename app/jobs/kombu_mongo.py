"""kombu's MongoDB transport, closing the MongoClient of each channel it closes.

kombu opens one MongoClient per channel and never closes it: every reconnection (a
broker step-down, a failed publish retried by Celery) leaks a client with its monitor
threads and sockets, for the life of the process. This subclass closes the client with
its channel, and also when opening the channel fails after the client was made (a
step-down during ``server_info`` or the index checks), which kombu leaves to the garbage
collector.

kombu also creates its capped ``messages.broadcast`` collection by check-then-create:
two workers starting together on a new broker database both find it missing, and the
second ``create`` fails with ``CollectionInvalid`` -- an "Unrecoverable error" that
stops that worker. Here the loser of that race takes the collection the winner made.
Everything else is kombu's.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import mongodb
from pymongo import MongoClient
from pymongo.errors import CollectionInvalid, OperationFailure

NAMESPACE_EXISTS = 48


class Channel(mongodb.Channel):
    def _open(self, scheme: str = "mongodb://") -> Any:
        """kombu's ``_open`` (less its gevent/eventlet patching, unused here), closing
        the new client when the server cannot be reached."""
        hostname, dbname, conf = self._parse_uri(scheme=scheme)
        conf["host"] = hostname
        client: MongoClient[Any] = MongoClient(**conf)
        try:
            client.server_info()  # kombu's version check: every supported server passes
        except BaseException:
            client.close()
            raise
        return client[dbname]

    def _create_client(self) -> Any:
        database = self._open()
        try:
            self._create_broadcast(database)
            self._ensure_indexes(database)
        except BaseException:
            database.client.close()
            raise
        return database

    def _create_broadcast(self, database: Any) -> None:
        try:
            super()._create_broadcast(database)
        except CollectionInvalid:
            pass  # a peer created it between kombu's check and its create
        except OperationFailure as exc:
            if exc.code != NAMESPACE_EXISTS:
                raise

    def close(self) -> None:
        database: Any = self.__dict__.get("client")  # kombu caches it once opened
        try:
            super().close()
        finally:
            if database is not None:
                database.client.close()


class Transport(mongodb.Transport):
    Channel = Channel
