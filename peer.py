"""The link between the two instances, over Unix sockets.

Each instance listens on its own socket and dials the other's, so there are
two connections and each carries one direction of the data:

    A dials B:   B -> A  HELLO {epoch, highWater, purgedAt}     (what B holds)
                 A -> B  PURGE (if B missed one), then every record B lacks,
                         then each record A pays, as it is paid; health
                         reports; purges; lookups (B answers on this connection)

Records are named by (origin epoch, sequence number), and sequence numbers of
one epoch travel in order, so "highWater" (the highest sequence held per
epoch) says exactly what a store lacks: a restarted or reconnected peer gets
everything it missed, and nothing is ever counted twice.

Messages are JSON arrays, one per line: ["R", records, finished, watched],
["S", processor, report], ["P", purgedAt], ["L", id, correlationId] /
["l", id, answer], ["H", payments] (pending payments handed over by an
instance shutting down), ["E", epoch, watched] (sent once the link is up).

The replica: each instance keeps a copy of the peer's *pending* payments, so
that a peer killed outright loses nothing. "E" carries all of them; then each
"R" adds the payments accepted or changed (`watched`: [payment wire,
processor an attempt is under way at, or None]) and drops those the records
in the same message paid or that were dead-lettered (`finished`). One
message, so a peer dying mid-write leaves either both or neither. An attempt
is announced before its request leaves; one the next dispatch pass will send
straight to the default processor is announced with the acceptance itself
(Dispatcher.claim), so most payments cost the peer two messages, not three.
When the peer's epoch is known dead
(a new epoch answers, or its socket refuses connections: no process listens)
and its connection has closed, its replica is inherited: each payment is
adopted here, one that was in flight pinned to that processor as after an
ambiguous attempt (its 422 then means "already paid": recorded once).
"""
import asyncio
import itertools
import logging
import os

import orjson

from timestamps import now_ms

log = logging.getLogger("peer")
RESYNC_CHUNK = 2000       # records per write while resynchronising (keeps each loop step short)
LINE_LIMIT = 16 * 1024 * 1024
RECONNECT_S = 0.25
LOOKUP_TIMEOUT_S = 0.5
_LINE = orjson.OPT_APPEND_NEWLINE     # one message per line, without copying it to add the newline


def replica_entry(payment):
    """What the peer keeps of one of our pending payments."""
    return [payment.to_wire(), payment.in_flight_to]


class _IncomingLink:
    """One connection from the peer: where to answer, and which epoch of the peer sends on it."""
    __slots__ = ("writer", "epoch")

    def __init__(self, writer):
        self.writer = writer
        self.epoch = None


class PeerLink:
    def __init__(self, settings, store, on_purge, on_health, on_lookup, on_adopt=None, pending=None,
                 on_inherit=None):
        self._listen_path = settings.peer_listen
        self._connect_path = settings.peer_connect
        self._store = store
        self._on_purge = on_purge        # apply a purge locally (store + book)
        self._on_health = on_health      # (processor, report) from the peer's monitor
        self._on_lookup = on_lookup      # correlationId -> description dict or None
        self._on_adopt = on_adopt        # list of handed-over payments (wire form)
        self._pending = pending          # () -> our pending payments (for the peer's replica)
        self._on_inherit = on_inherit    # (epoch, replica entries) of a peer that died
        self.purged_at = 0
        self.link_up = False             # our outgoing connection is synchronised
        self._writer = None
        self._syncing = False
        self._batch = []                 # records paid this loop step, flushed once per step
        self._finished = []              # correlationIds no longer pending here, same flush
        self._watched = []               # replica entries of payments accepted or changed, same flush
        self._replicas = {}              # peer epoch -> {correlationId: replica entry}
        self._links = set()              # the peer's connections to us still open (_IncomingLink)
        self._dead_epochs = set()        # peer epochs known to be gone, to inherit once closed
        self._outbox = []                # records paid while a resync is in progress
        self._flush_scheduled = False
        self._lookups = {}
        self._lookup_ids = itertools.count(1)
        self._server = None
        self._tasks = []
        self._incoming = set()           # tasks serving the peer's connections to us
        self.records_sent = 0
        self.records_received = 0
        self.connects = 0

    @property
    def enabled(self):
        return bool(self._listen_path and self._connect_path)

    async def start(self):
        if not self.enabled:
            return
        if os.path.exists(self._listen_path):
            os.unlink(self._listen_path)
        self._server = await asyncio.start_unix_server(self._serve_incoming, path=self._listen_path, limit=LINE_LIMIT)
        self._tasks.append(asyncio.get_running_loop().create_task(self._dial_forever()))

    async def close(self):
        for task in self._tasks + list(self._incoming):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._incoming, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        if self._writer is not None:
            self._writer.close()

    # ----- what the rest of the instance calls --------------------------------------
    def publish(self, record, payment):
        """A record this instance just paid: send it to the peer soon (same loop step)."""
        if self._writer is None:
            return                       # the resync after reconnecting will carry it
        if self._syncing:
            self._outbox.append(record)  # the replica snapshot at the end of the resync knows it paid
            return
        self._batch.append(record)
        self._finished.append(payment.correlation_id)
        self._schedule_flush()

    def watch(self, payment):
        """A pending payment was adopted or changed here: the peer's replica hears of it this loop step."""
        if self.link_up:
            self._watched.append(replica_entry(payment))
            self._schedule_flush()

    def watch_now(self, *payments):
        """Payments just accepted (before the 202 is written) or attempts about to start (before
        their requests leave): written to the peer at once."""
        if self.link_up:
            self._watched.extend(replica_entry(payment) for payment in payments)
            self._flush()

    def forget(self, payment):
        """A payment dead-lettered here: no longer pending."""
        if self.link_up:
            self._finished.append(payment.correlation_id)
            self._schedule_flush()

    def _schedule_flush(self):
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self):
        self._flush_scheduled = False
        batch, finished, watched = self._batch, self._finished, self._watched
        if not (batch or finished or watched):
            return
        self._batch, self._finished, self._watched = [], [], []
        if self._writer is not None:
            self._send(["R", batch, finished, watched])
            self.records_sent += len(batch)

    def send_health(self, processor, report):
        if self.link_up:
            self._send(["S", processor, report])

    def purge(self):
        """Purge here and at the peer (now, or when the link returns)."""
        self.purged_at = max(now_ms(), self.purged_at + 1)
        self._outbox.clear()
        self._batch.clear()
        self._on_purge()
        if self._writer is not None:
            self._send(["P", self.purged_at])

    async def hand_over(self, payments_wire):
        """Send pending payments to the peer at shutdown; True once they are written out."""
        if not self.link_up or not payments_wire:
            return False
        self._send(["H", payments_wire])
        try:
            await asyncio.wait_for(self._writer.drain(), 2.0)
        except (asyncio.TimeoutError, OSError, AttributeError):
            return False
        return True

    async def drain(self):
        """Push out whatever is buffered (records paid in the last loop steps)."""
        self._flush()
        if self._writer is not None:
            try:
                await asyncio.wait_for(self._writer.drain(), 2.0)
            except (asyncio.TimeoutError, OSError):
                pass

    async def lookup(self, correlation_id):
        """Ask the peer what it knows of a payment; None if it does not know or cannot answer."""
        if not self.link_up:
            return None
        request_id = next(self._lookup_ids)
        future = asyncio.get_running_loop().create_future()
        self._lookups[request_id] = future
        self._send(["L", request_id, correlation_id])
        try:
            return await asyncio.wait_for(future, LOOKUP_TIMEOUT_S)
        except asyncio.TimeoutError:
            return None
        finally:
            self._lookups.pop(request_id, None)

    def _send(self, message):
        try:
            self._writer.write(orjson.dumps(message, option=_LINE))
        except Exception:
            pass                         # a broken link is noticed by its reader

    # ----- outgoing: our records to the peer ----------------------------------------
    async def _dial_forever(self):
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self._connect_path, limit=LINE_LIMIT)
            except ConnectionRefusedError:
                # The socket file is there but nothing listens: the process that held it is gone
                # (a live peer's full backlog answers EAGAIN, not this).
                self._dead_epochs.update(self._replicas)
                self._inherit_dead()
                await asyncio.sleep(RECONNECT_S)
                continue
            except OSError:
                await asyncio.sleep(RECONNECT_S)
                continue
            try:
                await self._run_outgoing(reader, writer)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                log.info("peer link lost: %s", type(exc).__name__)
            finally:
                self.link_up = False
                self._writer = None
                self._syncing = False
                self._outbox.clear()
                self._batch.clear()
                self._finished.clear()
                self._watched.clear()
                writer.close()
                for future in self._lookups.values():
                    if not future.done():
                        future.set_result(None)
            await asyncio.sleep(RECONNECT_S)

    async def _run_outgoing(self, reader, writer):
        hello = orjson.loads(await reader.readline() or b"null")
        if not isinstance(hello, dict):
            raise ValueError("peer sent no hello")
        self._peer_epoch_is(hello["epoch"])
        if hello["purgedAt"] > self.purged_at:
            self._apply_purge(hello["purgedAt"])
        self._writer = writer
        if hello["purgedAt"] < self.purged_at:
            self._send(["P", self.purged_at])
        self._syncing = True
        missing = self._store.records_above(hello["highWater"])
        chunk = []
        for record in missing:
            chunk.append(record)
            if len(chunk) == RESYNC_CHUNK:
                self._send(["R", chunk])
                self.records_sent += len(chunk)
                chunk = []
                await writer.drain()
        if chunk:
            self._send(["R", chunk])
            self.records_sent += len(chunk)
        self._syncing = False
        if self._outbox:
            self._send(["R", self._outbox])
            self.records_sent += len(self._outbox)
            self._outbox = []
        pending = self._pending() if self._pending is not None else []
        self._send(["E", self._store.local_epoch, [replica_entry(payment) for payment in pending]])
        self.link_up = True
        self.connects += 1
        log.info("peer link up (peer epoch %s, %d records sent)", hello["epoch"], self.records_sent)
        while True:
            line = await reader.readline()
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            message = orjson.loads(line)
            if message[0] == "l":
                future = self._lookups.get(message[1])
                if future is not None and not future.done():
                    future.set_result(message[2])

    # ----- incoming: the peer's records to us ---------------------------------------
    async def _serve_incoming(self, reader, writer):
        task = asyncio.current_task()
        self._incoming.add(task)
        hello = {"epoch": self._store.local_epoch, "highWater": self._store.high_water(),
                 "purgedAt": self.purged_at}
        writer.write(orjson.dumps(hello, option=_LINE))
        link = _IncomingLink(writer)
        self._links.add(link)
        try:
            while True:
                line = await reader.readline()
                if not line or not line.endswith(b"\n"):
                    break                # closed, possibly mid-line by a peer that died: drop the part
                self._handle(orjson.loads(line), link)
        except (OSError, ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError) as exc:
            log.info("peer connection closed: %s", type(exc).__name__)
        except asyncio.CancelledError:
            pass                         # shutting down: close quietly
        finally:
            self._incoming.discard(task)
            self._links.discard(link)
            writer.close()
            self._inherit_dead()

    def _handle(self, message, link):
        kind = message[0]
        writer = link.writer
        if kind == "R":
            ingest = self._store.ingest
            for record in message[1]:
                if ingest(*record):
                    self.records_received += 1
            replica = self._replicas.get(link.epoch) if len(message) > 2 else None
            if replica is not None:
                for entry in message[3]:
                    replica[entry[0][0]] = entry
                for correlation_id in message[2]:
                    replica.pop(correlation_id, None)
        elif kind == "E":
            link.epoch = epoch = message[1]
            self._replicas[epoch] = {entry[0][0]: entry for entry in message[2]}
            self._peer_epoch_is(epoch)
        elif kind == "S":
            self._on_health(message[1], message[2])
        elif kind == "P":
            if message[1] > self.purged_at:
                self._apply_purge(message[1])
        elif kind == "H":
            replica = self._replicas.get(link.epoch, {})
            for wire in message[1]:
                replica.pop(wire[0], None)
            if self._on_adopt is not None:
                self._on_adopt(message[1])
        elif kind == "L":
            writer.write(orjson.dumps(["l", message[1], self._on_lookup(message[2])], option=_LINE))

    # ----- the peer's replica: inherited once its epoch is gone -----------------------
    def _peer_epoch_is(self, epoch):
        """The peer's process now runs as `epoch`: any other epoch of it is dead."""
        self._dead_epochs.update(known for known in self._replicas if known != epoch)
        self._inherit_dead()

    def _inherit_dead(self):
        # Only once a dead epoch's connections have closed: every message it sent has been applied.
        open_epochs = {link.epoch for link in self._links}
        for epoch in [e for e in self._dead_epochs if e not in open_epochs]:
            self._dead_epochs.discard(epoch)
            entries = self._replicas.pop(epoch, None)
            if entries and self._on_inherit is not None:
                self._on_inherit(epoch, list(entries.values()))

    def replica_size(self):
        return sum(len(entries) for entries in self._replicas.values())

    def _apply_purge(self, purged_at):
        self.purged_at = purged_at
        self._outbox.clear()
        self._batch.clear()
        self._on_purge()
