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

kombu writes each message with its own ``insert_one`` after reading the queue's
definition (for its message TTL), two commands per message. ``buffered_puts`` lets a
publisher of many messages at once (the renewal scan's batches) write them with one
``insert_many`` and read each queue's definition once. Everything else is kombu's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import mongodb
from pymongo import MongoClient
from pymongo.errors import CollectionInvalid, OperationFailure

NAMESPACE_EXISTS = 48


class _BufferedInserts:
    """Stands in for kombu's ``messages`` collection while puts are buffered: keeps what
    kombu's ``_put`` inserts, hands every other use to the real collection."""

    def __init__(self, collection: Any) -> None:
        self.collection = collection
        self.documents: list[dict[str, Any]] = []

    def insert_one(self, document: dict[str, Any]) -> None:
        self.documents.append(document)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.collection, name)


class Channel(mongodb.Channel):
    _queue_expire_memo: dict[tuple[str, str], Any] | None = None

    @contextmanager
    def buffered_puts(self) -> Iterator[None]:
        """Messages put to a queue inside the block are written together, with one
        ``insert_many``, when the block ends without an exception (none are written if it
        raises); each queue's definition is read once for the block. kombu's own
        ``_put`` builds every message document, so they are the ones it would write."""
        if self._queue_expire_memo is not None:  # nested: the outer block writes
            yield
            return
        real = self.messages  # kombu caches it in the instance (cached_property)
        buffer = _BufferedInserts(real)
        self.__dict__["messages"] = buffer
        self._queue_expire_memo = {}
        try:
            yield
        finally:
            self.__dict__["messages"] = real
            self._queue_expire_memo = None
        if buffer.documents:
            real.insert_many(buffer.documents, ordered=False)

    def _get_queue_expire(self, queue: Any, argument: str) -> Any:
        memo = self._queue_expire_memo
        if memo is None or not isinstance(queue, str):
            return super()._get_queue_expire(queue, argument)
        if (queue, argument) not in memo:
            memo[(queue, argument)] = super()._get_queue_expire(queue, argument)
        return memo[(queue, argument)]

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
