"""The link between the two instances, over Unix sockets.

Each instance listens on its own socket and dials the other's, so there are
two connections and each carries one direction of the data:

    A dials B:   B -> A  HELLO {protocol, epoch, highWater, purgedAt}   (what B holds)
                 A -> B  PURGE (if B missed one), then every record B lacks,
                         then "E" (the end of the resync, with the replica),
                         then each record A pays, as it is paid; health
                         reports; purges; lookups (B answers on this connection)

Records are named by (origin epoch, sequence number), and sequence numbers of
one epoch travel in order, so "highWater" (the highest sequence held per
epoch) says exactly what a store lacks: a restarted or reconnected peer gets
everything it missed, and nothing is ever counted twice (the store also holds
one record per correlationId, whatever path it came by).

Messages are JSON arrays, one per line: ["I", epoch, n] (first: who sends, on
its n-th connection),
["R", records, finished, watched], ["S", processor, report], ["P", purgedAt],
["L", id, correlationId] / ["l", id, answer], ["H", id, payments] /
["h", id, taken] (pending payments handed over by an instance shutting down,
and whether the peer took them: it does not while it stops too),
["W", entries]... ["E", epoch] (the replica snapshot, in chunks, then the end
of the resync). A hello of another protocol version is refused: the link stays
down.

Purges. A purge is the instant it was asked for (purgedAt, ms); each store
drops the records with an earlier requestedAt, also those that arrive after the
purge did (store.py). So a record crossing a purge on the wire, or paid by an
instance the purge reaches late, ends the same at both.

Readiness. An instance with a peer is not ready (it answers no summary) until
it holds the peer's records up to the peer's high-water mark ("E" received),
or knows the peer is absent (its socket refuses connections, or is not there),
or PEER_SYNC_TIMEOUT_S has passed. The survivor dials back at once when the
peer connects to it, rather than at its next reconnect period.

The replica: each instance keeps a copy of the peer's *pending* payments, so
that a peer killed outright loses nothing. The snapshot ("W" chunks, then "E")
carries all of them, and replaces the copy only whole, at "E"; then each "R"
adds the payments accepted or changed (`watched`: replica entries) and drops
those its records paid or that were dead-lettered (`finished`); any record
drops its payment too. One message, so a peer dying mid-write leaves either
both or neither. An epoch's connections follow one another (it wrote all of its
n-th before its n+1-th), but they may be read interleaved: what an older
connection still brings after a newer one's "E" is older than that snapshot
and is dropped; before it, it still applies, except where a newer connection
has spoken of that payment (_Replica). A snapshot cut short (its connection
closed before "E") is laid over the copy the same way. A restarted peer gets
our snapshot's "E" (and is ready) only once what its predecessor left pending
here is inherited and adopted, so that it knows those payments before it
takes any. An acceptance is in the kernel's socket buffer to the
peer before its 202 is written, and an attempt before its request leaves: while
the peer does not read (the buffer is full), answers and attempts wait for
their own bytes (_Outgoing); if one has waited PEER_STALL_S the link is dropped
and the instance carries on alone, as after a cut.
Epochs: "<instance>-<start time, ns on the host's monotonic clock>"; every connection says first which
epoch sends on it ("I"). An epoch is known dead when a later one says hello or
connects, or its socket refuses connections (no process listens); a dead epoch
never comes back, and one older than an epoch already seen says nothing of
others. Once every connection of a dead epoch has closed (every message it sent
applied), its replica is inherited: each payment is adopted here, one that was
in flight pinned to that processor as after an ambiguous attempt. A dead
epoch's connections are its last word: read late, they still update its
replica. Records they still deliver are passed on to its successor, behind
the resync under way to it if there is one (a store takes an epoch's records
only in order).
"""
import asyncio
import itertools
import logging
import os
from collections import deque

import orjson

from payments import PENDING, entry_cents, entry_id, replica_entry, wire_id
from store import record_correlation_id
from timestamps import now_ms

log = logging.getLogger("peer")
PROTOCOL = 4              # "R" carries acknowledgements of what was read (the payments' gates)
RESYNC_CHUNK = 2000       # records per write while resynchronising (keeps each loop step short)
SNAPSHOT_CHUNK = 2000     # replica entries per line of the snapshot, and payments per hand-over line
LINE_LIMIT = 16 * 1024 * 1024
RECONNECT_S = 0.25
LOOKUP_TIMEOUT_S = 0.5
HAND_OVER_TIMEOUT_S = 2.0
ACK_DELAY_S = 0.003       # we say what we have read of the peer's acceptances within this (sooner with our own lines)
GATE_POLL_S = 0.05        # how often held payments look again (adoption under way, deadlines)
GATE_STALL_S = 0.2        # a poll this late means the process was not running meanwhile
_LINE = orjson.OPT_APPEND_NEWLINE     # one message per line, without copying it to add the newline

# How a wait for the peer to read ends (replicated()).
DRAINED, STALLED, LOST = "drained", "stalled", "lost"


class _Outgoing:
    """Our connection to the peer: how many bytes were written to it, how many have left this
    process (they are in the kernel, which delivers them even if this process dies next), and
    who waits for which of them: an acceptance's 202, an attempt's request. A waiter that has
    waited PEER_STALL_S means the peer is not reading: the connection is dropped, and each waiter
    learns whether its bytes had left (DRAINED) or not (STALLED)."""
    POLL_S = 0.002

    def __init__(self, writer, stall_s, on_stall, number=0):
        self.writer = writer
        self.number = number             # which of our connections to the peer this is (our "I")
        self._transport = writer.transport
        self._loop = asyncio.get_running_loop()
        self._stall_s = stall_s
        self._on_stall = on_stall
        self.sent = 0                    # bytes handed to the transport
        self._waiters = deque()          # (offset, future, since), offsets ascending
        self._timer = None
        self.closed = None               # how it ended (STALLED or LOST), once it has
        self._left = 0                   # bytes that had left this process when it ended

    def write(self, data):
        self._transport.write(data)
        self.sent += len(data)

    def buffered(self):
        return self._transport.get_write_buffer_size() > 0

    def _out(self):
        return self.sent - self._transport.get_write_buffer_size()

    def wait(self, offset):
        """A future: DRAINED once the first `offset` bytes have left this process; STALLED or LOST
        if the connection goes first."""
        future = self._loop.create_future()
        if self.closed:
            future.set_result(DRAINED if self._left >= offset else self.closed)
        elif self._out() >= offset:
            future.set_result(DRAINED)
        else:
            self._waiters.append((offset, future, self._loop.time()))
            if self._timer is None:
                self._timer = self._loop.call_later(self.POLL_S, self._poll)
        return future

    def _poll(self):
        self._timer = None
        self._release(self._out())
        if not self._waiters:
            return
        if self._loop.time() - self._waiters[0][2] >= self._stall_s:
            self._on_stall()
            self.close(STALLED)
        else:
            self._timer = self._loop.call_later(self.POLL_S, self._poll)

    def _release(self, out):
        waiters = self._waiters
        while waiters and waiters[0][0] <= out:
            future = waiters.popleft()[1]
            if not future.done():
                future.set_result(DRAINED)

    def close(self, outcome=LOST):
        """The connection is gone, or (STALLED) dropped here now: what is still buffered never
        leaves. Waiters whose bytes left are told DRAINED, the others `outcome`, newest first."""
        if self.closed:
            return
        self.closed = outcome
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._left = self._out()
        self._release(self._left)
        if outcome == STALLED:
            self._transport.abort()
        while self._waiters:
            future = self._waiters.pop()[1]
            if not future.done():
                future.set_result(outcome)


class _Replica:
    """One peer epoch's pending payments, as its connections tell them. The epoch wrote all of
    its n-th connection before its n+1-th, but they may be read interleaved: a connection older
    than the one whose snapshot ("E") made the copy says nothing more, and one newer than it
    (whose snapshot is still on its way, or was cut short) is never overridden by an older one."""
    __slots__ = ("entries", "base", "said_by")

    def __init__(self):
        self.entries = {}                # correlationId -> replica entry
        self.base = 0                    # the connection whose snapshot made the copy
        self.said_by = {}                # correlationId -> newer-than-base connection that set or dropped it

    def _older(self, number, correlation_id):
        return number < self.base or self.said_by.get(correlation_id, number) > number

    def set(self, number, entry):
        correlation_id = entry_id(entry)
        if self._older(number, correlation_id):
            return
        self.entries[correlation_id] = entry
        if number > self.base:
            self.said_by[correlation_id] = number

    def drop(self, number, correlation_id):
        if self._older(number, correlation_id):
            return
        self.entries.pop(correlation_id, None)
        if number > self.base:
            self.said_by[correlation_id] = number       # an older connection must not bring it back

    def paid(self, correlation_id, number=0):
        """A record of it exists (heard on connection `number`): whatever any connection says, it
        is not pending, and no older one read late brings it back."""
        self.entries.pop(correlation_id, None)
        if number > self.base:
            self.said_by[correlation_id] = max(number, self.said_by.get(correlation_id, number))

    def replace(self, number, snapshot):
        """Connection `number`'s whole snapshot: it replaces what connections up to it said."""
        if number < self.base:
            return
        newer = {cid: n for cid, n in self.said_by.items() if n > number}
        entries = {cid: entry for cid, entry in snapshot.items() if cid not in newer}
        entries.update((cid, self.entries[cid]) for cid in newer if cid in self.entries)
        self.entries, self.base, self.said_by = entries, number, newer


class _IncomingLink:
    """One connection from the peer: where to answer, and which epoch of the peer sends on it."""
    __slots__ = ("writer", "epoch", "number", "staging", "handled", "acked", "closed", "heard_at")

    def __init__(self, writer):
        self.writer = writer
        self.epoch = None                # said first on the connection ("I"), with
        self.number = 0                  # which of that epoch's connections this is
        self.staging = None              # the replica snapshot being received ("W"... "E")
        self.handled = 0                 # bytes of its lines applied here (what we acknowledge)
        self.acked = {}                  # our connection number -> bytes of it the peer says it applied
        self.closed = False              # ended at its end of file: every line it carried is applied
        self.heard_at = 0.0              # when its last line was applied (loop time)


class _Reader(asyncio.StreamReader):
    """A StreamReader that reads a reset as an end of file. A Unix socket whose peer died with our
    bytes unread in its buffer reports ECONNRESET after the lines it had queued for us: the
    connection ended there, every line it carried is kept (a plain StreamReader raises at once,
    dropping any still buffered) and it counts as closed for the payments waiting on it."""

    def set_exception(self, exc):
        if isinstance(exc, ConnectionResetError):
            self.feed_eof()
        else:
            super().set_exception(exc)


class _Gate:
    """A payment just accepted here, held until the peer has said all it had to say of it: each
    of the peer's connections open at the acceptance has either closed (its every line applied)
    or acknowledged the bytes that carried the acceptance (whatever the peer wrote before
    reading it has been applied here first: if the peer held that payment too, we know now)."""
    __slots__ = ("on_heard", "out", "offset", "links", "since")

    def __init__(self, on_heard, mark, links, since):
        self.on_heard = on_heard
        # Our _Outgoing that carried the acceptance, and the bytes up to its end (None: no link).
        self.out, self.offset = mark if mark is not None else (None, 0)
        self.links = links
        self.since = since


class PeerLink:
    def __init__(self, settings, store, on_purge, on_health, on_lookup, on_adopt=None, pending=None,
                 on_inherit=None, on_settled=None, adopting=None):
        self._listen_path = settings.peer_listen
        self._connect_path = settings.peer_connect
        self._stall_s = settings.peer_stall_s
        self._sync_timeout_s = settings.peer_sync_timeout_s
        self._store = store
        self._on_purge = on_purge        # (purgedAt) apply a purge locally (store + book)
        self._on_health = on_health      # (processor, report) from the peer's monitor
        self._on_lookup = on_lookup      # correlationId -> description dict or None
        self._on_adopt = on_adopt        # handed-over payments (wire form) -> taken (bool)
        self._pending = pending          # () -> our pending payments (for the peer's replica)
        self._on_inherit = on_inherit    # (epoch, replica entries) of a peer that died
        self._on_settled = on_settled    # (record) a record from the peer, new here
        self._adopting = adopting        # () -> True while inherited payments are still being adopted
        self.purged_at = 0
        self.link_up = False             # our outgoing connection is synchronised
        self.synced = False              # we hold the peer's records up to its high-water mark
        self.peer_absent = False         # the peer's socket refused us, or is not there
        self._ready = False
        self._writer = None
        self._out = None                 # _Outgoing of the current connection to the peer
        self._syncing = False
        self._batch = []                 # records paid this loop step, flushed once per step
        self._finished = []              # correlationIds no longer pending here, same flush
        self._watched = []               # replica entries of payments accepted or changed, same flush
        self._replicas = {}              # peer epoch -> _Replica
        self._links = set()              # the peer's connections to us still open (_IncomingLink)
        self._dead_epochs = set()        # peer epochs known to be gone, to inherit once closed
        self._gone = set()               # every peer epoch ever known to be gone (never alive again)
        self._ended = set()              # peer epochs whose connection from us ended from their side
        self._out_epoch = None           # the peer epoch our current (or last) connection reached
        self._outbox = []                # records paid while a resync is in progress
        self._flush_scheduled = False
        self._ack_wanted = False         # the peer's acceptances were applied here since our last ack
        self._ack_timer = None
        self._gates = []                 # _Gate of payments held until the peer's word is in
        self._gate_timer = None
        self._last_poll = 0.0
        self._listening_since = 0.0      # since when this process has been reading its sockets (_poll_gates)
        self.gates_expired = 0           # payments released by the deadline, not by the peer's word
        self._dial_now = None            # asyncio.Event: the peer connected to us, dial it back now
        self._lookups = {}
        self._lookup_ids = itertools.count(1)
        self._server = None
        self._started_at = None
        self._tasks = []
        self._incoming = set()           # tasks serving the peer's connections to us
        self.records_sent = 0
        self.records_received = 0
        self._dials = 0                  # connections made to the peer (numbered in their "I")
        self.connects = 0
        self.stalls = 0

    @property
    def enabled(self):
        return bool(self._listen_path and self._connect_path)

    @property
    def ready(self):
        """Summaries can be answered: no peer, or its records are in, or it is absent (or too slow).
        Once ready, always (it is asked on every payment)."""
        if self._ready:
            return True
        if not self.enabled or self.synced or self.peer_absent or (
                self._started_at is not None
                and asyncio.get_running_loop().time() - self._started_at >= self._sync_timeout_s):
            self._ready = True
        return self._ready

    async def start(self):
        if not self.enabled:
            return
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        self._dial_now = asyncio.Event()
        if os.path.exists(self._listen_path):
            os.unlink(self._listen_path)
        self._server = await loop.create_unix_server(
            lambda: asyncio.StreamReaderProtocol(_Reader(limit=LINE_LIMIT), self._serve_incoming), path=self._listen_path)
        self._tasks.append(loop.create_task(self._dial_forever()))

    async def close(self):
        for timer in (self._ack_timer, self._gate_timer):
            if timer is not None:
                timer.cancel()
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
        if self._writer is not None and not self._syncing:
            self._finished.append(payment.correlation_id)   # (a resync's snapshot knows it paid)
        self._pass_on((record,))

    def _pass_on(self, records):
        """Records for the peer: this step's flush, or behind the resync under way (a store takes
        an epoch's records only in order); none without a link (the next resync carries them)."""
        if self._writer is None:
            return
        if self._syncing:
            self._outbox.extend(records)
            return
        self._batch.extend(records)
        self._schedule_flush()

    def watch(self, payment):
        """A pending payment was adopted or changed here: the peer's replica hears of it this loop step."""
        if self.link_up:
            self._watched.append(replica_entry(payment))
            self._schedule_flush()

    def watch_now(self, *payments):
        """Payments just accepted (before the 202 is written) or attempts about to start (before
        their requests leave): written to the peer at once (see backlogged())."""
        if self.link_up:
            self._watched.extend(replica_entry(payment) for payment in payments)
            self._flush()

    def forget(self, payment):
        """A payment finished here without a record to send (dead-lettered, or already recorded)."""
        if self.link_up:
            self._finished.append(payment.correlation_id)
            self._schedule_flush()

    def pending_entry(self, correlation_id):
        """The replica entry of a payment the peer holds pending (per its replica here), or None."""
        for replica in self._replicas.values():
            entry = replica.entries.get(correlation_id)
            if entry is not None:
                return entry
        return None

    def pending_cents(self, correlation_id):
        entry = self.pending_entry(correlation_id)
        return None if entry is None else entry_cents(entry)

    def when_heard(self, on_heard, mark=None):
        """A payment was just accepted here, its acceptance written to the peer up to `mark`
        (mark(); by default, all written so far): call on_heard() once the peer's word on it is
        in (see _Gate); or once the connections waited for have been quiet for PEER_STALL_S (a
        live peer that does not answer), unless one is a dead epoch's, whose last lines may still
        come; or after PEER_SYNC_TIMEOUT_S in any case. False (and no call) when no connection
        from the peer is open: there is nothing to wait for. A repeat reaching this instance before
        the peer's last lines on that payment were read is so a second copy only until those lines
        are applied, never paid twice."""
        if not self._links:
            return False
        loop = asyncio.get_running_loop()
        if mark is None:
            mark = self.mark()
        self._gates.append(_Gate(on_heard, mark, set(self._links), loop.time()))
        if self._gate_timer is None:
            self._last_poll = loop.time()
            self._gate_timer = loop.call_later(GATE_POLL_S, self._poll_gates)
        return True

    def held_for_word(self):
        return len(self._gates)

    def _heard(self, gate, now):
        age = now - max(gate.since, self._listening_since)
        if age >= self._sync_timeout_s:
            self.gates_expired += 1
            return True
        if self._adopting is not None and self._adopting():
            return False                 # an inherited copy of it may still be on its way into the book
        waiting = [link for link in gate.links if not link.closed and not (
            gate.out is not None and link.staging is None and link.acked.get(gate.out.number, -1) >= gate.offset)]
        if not waiting:
            return True
        # A live peer that does not answer (stopped, or its link dropped here for a stall): carry
        # on once what we wait for has said nothing for PEER_STALL_S. Not while a dead process's
        # last lines may still come: an epoch known gone, or one whose connection from us ended
        # from its side (a dead process's connections end at once, unless a slow link still
        # delivers them).
        quiet = now - self._stall_s
        if age >= self._stall_s and all(max(link.heard_at, self._listening_since) <= quiet for link in waiting) \
                and not any(link.epoch in self._gone or link.epoch in self._ended for link in waiting):
            self.gates_expired += 1
            return True
        return False

    def _open_gates(self):
        if not self._gates:
            return
        now = asyncio.get_running_loop().time()
        still, heard = [], []
        for gate in self._gates:
            (heard if self._heard(gate, now) else still).append(gate)
        self._gates = still
        for gate in heard:
            try:
                gate.on_heard()
            except Exception:            # one payment's decision must not strand the others
                log.exception("deciding a held payment failed")

    def _poll_gates(self):
        self._gate_timer = None
        now = asyncio.get_running_loop().time()
        if now - self._last_poll > GATE_STALL_S:
            # This process was not running (stopped, or its loop blocked): the timers run before
            # the sockets are read, so what the peer wrote meanwhile is not applied yet. Time
            # without listening does not count towards a deadline.
            self._listening_since = now
        self._last_poll = now
        self._open_gates()
        if self._gates:
            self._gate_timer = asyncio.get_running_loop().call_later(GATE_POLL_S, self._poll_gates)

    def _want_ack(self):
        self._ack_wanted = True
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY_S, self._ack_due)

    def _ack_due(self):
        self._ack_timer = None
        self._flush()

    def _take_acks(self):
        """What we have applied of each of the peer's connections, if it is due and can be said:
        only once our own resync is through (a record still in the outbox must reach the peer
        before an ack that says we have read its acceptances)."""
        if not (self._ack_wanted and self.link_up):
            return []
        self._ack_wanted = False
        return [[link.epoch, link.number, link.handled] for link in self._links
                if link.epoch is not None and link.number >= 0]

    def backlogged(self):
        """True while something written to the peer is still in this process, not in the kernel:
        an acceptance written now would not survive this process's death."""
        return self.link_up and self._out.buffered()

    def mark(self):
        """Where what was written so far ends: on which connection, after how many bytes (what
        replicated() waits for); None when there is no link."""
        return (self._out, self._out.sent) if self.link_up else None

    def replication(self, mark):
        """A future for what was written up to `mark`: DRAINED, STALLED or LOST (see replicated)."""
        out, offset = mark
        return out.wait(offset)

    async def replicated(self, mark=None):
        """Wait until what was written up to `mark` (by default, all written so far) has left
        this process: DRAINED; STALLED: the peer read nothing for PEER_STALL_S, the link was
        dropped and those bytes never reach it; LOST: the link went otherwise, or there is none
        (this instance runs alone; a new link's resync carries the pending payments again)."""
        if mark is None:
            mark = self.mark()
            if mark is None:
                return LOST
        out, offset = mark
        return await asyncio.shield(out.wait(offset))

    def _stalled(self):
        self.link_up = False             # from now on this instance runs alone, as after a cut
        self.stalls += 1
        log.warning("peer read nothing for %.1f s: link dropped, carrying on alone", self._stall_s)

    def _schedule_flush(self):
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self):
        self._flush_scheduled = False
        batch, finished, watched = self._batch, self._finished, self._watched
        acks = self._take_acks()
        if not (batch or finished or watched or acks):
            return
        self._batch, self._finished, self._watched = [], [], []
        if self._writer is not None:
            self._send(["R", batch, finished, watched, acks])   # acks last: applied after the rest
            self.records_sent += len(batch)

    def send_health(self, processor, report):
        if self.link_up:
            self._send(["S", processor, report])

    def purge(self):
        """Purge here and at the peer (now, or when the link returns)."""
        self._apply_purge(max(now_ms(), self.purged_at + 1))
        if self._writer is not None:
            self._send(["P", self.purged_at])

    async def hand_over(self, payments_wire):
        """Send pending payments to the peer at shutdown, SNAPSHOT_CHUNK per line; the wire forms
        the peer did not say it took (it refuses while it is stopping too, and says nothing if the
        link breaks)."""
        left = []
        for start in range(0, len(payments_wire), SNAPSHOT_CHUNK):
            chunk = payments_wire[start:start + SNAPSHOT_CHUNK]
            if not (self.link_up and await self._hand_over_chunk(chunk)):
                left += chunk
        return left

    async def _hand_over_chunk(self, chunk):
        request_id = next(self._lookup_ids)
        future = asyncio.get_running_loop().create_future()
        self._lookups[request_id] = future
        self._send(["H", request_id, chunk])
        try:
            return await asyncio.wait_for(future, HAND_OVER_TIMEOUT_S) is True
        except asyncio.TimeoutError:
            return False
        finally:
            self._lookups.pop(request_id, None)

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
            self._out.write(orjson.dumps(message, option=_LINE))
        except Exception:
            pass                         # a broken link is noticed by its reader

    # ----- outgoing: our records to the peer ----------------------------------------
    async def _dial_forever(self):
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self._connect_path, limit=LINE_LIMIT)
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                # Nothing listens there (a live peer's full backlog answers EAGAIN, not this):
                # the process that held it is gone, or there is none yet.
                self.peer_absent = True
                if isinstance(exc, ConnectionRefusedError):
                    self._declare_dead(set(self._replicas))
                await self._pause()
                continue
            except OSError:
                await self._pause()
                continue
            try:
                await self._run_outgoing(reader, writer)
            except _Incompatible as exc:
                log.error("peer link refused: %s", exc)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError, TypeError, KeyError) as exc:
                log.info("peer link lost: %s", type(exc).__name__)
            finally:
                self.link_up = False
                if self._out is not None:
                    if self._out.closed != STALLED and self._out_epoch is not None:
                        self._ended.add(self._out_epoch)   # it ended from its side: it may be dead
                    self._out.close()
                self._writer = self._out = None
                self._syncing = False
                self._outbox.clear()
                self._batch.clear()
                self._finished.clear()
                self._watched.clear()
                writer.close()
                for future in self._lookups.values():
                    if not future.done():
                        future.set_result(None)
            await self._pause()

    async def _pause(self):
        """RECONNECT_S between dials, cut short when the peer connects to us (it is back)."""
        self._dial_now.clear()
        try:
            await asyncio.wait_for(self._dial_now.wait(), RECONNECT_S)
        except asyncio.TimeoutError:
            pass

    async def _run_outgoing(self, reader, writer):
        line = await reader.readline()
        if not line:
            # Closed before any hello: no instance behind the socket (a forwarder whose other
            # side is gone, say). A live instance says hello as it accepts.
            self.peer_absent = True
            raise ConnectionResetError("closed before the hello")
        hello = orjson.loads(line)
        if not isinstance(hello, dict):
            raise ValueError("peer sent no hello")
        if hello.get("protocol") != PROTOCOL:
            self.peer_absent = True      # nothing can be exchanged with it: do not wait for its records
            raise _Incompatible("peer speaks protocol %r, this instance %d" % (hello.get("protocol"), PROTOCOL))
        self.peer_absent = False
        # Everything buffered here counts as not yet replicated (backlogged()): drain() waits
        # until the kernel holds all of it.
        writer.transport.set_write_buffer_limits(high=0)
        self._peer_epoch_is(hello["epoch"])
        self._out_epoch = hello["epoch"]
        self._ended.discard(self._out_epoch)             # it answers: alive
        if hello["purgedAt"] > self.purged_at:
            self._apply_purge(hello["purgedAt"])
        self._writer = writer
        self._dials += 1
        self._out = _Outgoing(writer, self._stall_s, self._stalled, self._dials)
        self._send(["I", self._store.local_epoch, self._dials])   # who sends on this connection, first
        if hello["purgedAt"] < self.purged_at:
            self._send(["P", self.purged_at])
        self._syncing = True
        chunk = []
        for found in self._store.records_above_in_steps(hello["highWater"]):
            chunk += found
            if len(chunk) >= RESYNC_CHUNK:
                self._send(["R", chunk, [], []])
                self.records_sent += len(chunk)
                chunk = []
                await writer.drain()
            else:
                await asyncio.sleep(0)           # a long scan that finds little still lets requests in
        if chunk:
            self._send(["R", chunk, [], []])
            self.records_sent += len(chunk)
        self._syncing = False
        outbox, self._outbox = self._outbox, []
        for start in range(0, len(outbox), RESYNC_CHUNK):
            self._send(["R", outbox[start:start + RESYNC_CHUNK], [], []])
        self.records_sent += len(outbox)
        # The replica snapshot, in chunks (a long queue would make one line of many MB, and as many
        # ms to build and to read). The link is up from here: a payment accepted or changed
        # meanwhile travels in an "R" behind the chunks sent so far, and each chunk is built from
        # the payments as they are when it is sent, so none is older than what went before it.
        self.link_up = True
        pending = self._pending() if self._pending is not None else []
        for start in range(0, max(len(pending), 1), SNAPSHOT_CHUNK):   # one "W" at least: it opens the staging
            self._send(["W", [replica_entry(payment) for payment in pending[start:start + SNAPSHOT_CHUNK]
                              if payment.state == PENDING]])
            snapshot_end = self._out.sent
            await writer.drain()
        # Payments held since an earlier connection: this snapshot carried them, so the peer's
        # acknowledgement of it is its word on them. And an acknowledgement we owed while the link
        # was down goes now (behind our snapshot: the peer counts it once it holds our payments).
        for gate in self._gates:
            if gate.out is not self._out:
                gate.out, gate.offset = self._out, snapshot_end
        if self._ack_wanted:
            self._schedule_flush()
        self.connects += 1
        log.info("peer link up (peer epoch %s, %d records sent)", hello["epoch"], self.records_sent)
        end = asyncio.ensure_future(self._end_snapshot())
        try:
            while True:
                line = await reader.readline()
                if not line:
                    raise asyncio.IncompleteReadError(b"", None)
                message = orjson.loads(line)
                if message[0] in ("l", "h"):          # a lookup's answer, a hand-over's acknowledgement
                    future = self._lookups.get(message[1])
                    if future is not None and not future.done():
                        future.set_result(message[2])
        finally:
            end.cancel()

    async def _end_snapshot(self):
        """A restarted peer is ready at our "E": first let what its predecessor left pending here be
        inherited and adopted (each adopted payment reaches it meanwhile, as an "R"), or a repeat
        of one would be a second copy there. Answers to our lookups are read meanwhile."""
        deadline = asyncio.get_running_loop().time() + self._sync_timeout_s
        while (self._dead_epochs or (self._adopting is not None and self._adopting())) \
                and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        self._send(["E", self._store.local_epoch])

    # ----- incoming: the peer's records to us ---------------------------------------
    async def _serve_incoming(self, reader, writer):
        task = asyncio.current_task()
        self._incoming.add(task)
        if self._writer is None:
            self._dial_now.set()         # the peer is there: dial it back without waiting
        hello = {"protocol": PROTOCOL, "epoch": self._store.local_epoch, "highWater": self._store.high_water(),
                 "purgedAt": self.purged_at}
        writer.write(orjson.dumps(hello, option=_LINE))
        link = _IncomingLink(writer)
        self._links.add(link)
        try:
            while True:
                line = await reader.readline()
                if not line or not line.endswith(b"\n"):
                    link.closed = True   # at its end, possibly mid-line by a peer that died: drop the part
                    break
                self._handle(orjson.loads(line), link)
                link.handled += len(line)
                link.heard_at = asyncio.get_running_loop().time()
        except (OSError, ValueError, IndexError, TypeError, KeyError, asyncio.LimitOverrunError,
                asyncio.IncompleteReadError) as exc:
            log.info("peer connection closed: %s", type(exc).__name__)
        except asyncio.CancelledError:
            pass                         # shutting down: close quietly
        finally:
            self._incoming.discard(task)
            self._links.discard(link)
            writer.close()
            if link.staging is not None and link.number >= 0:
                self._lay_over(link, link.staging)   # a snapshot cut short: its word, as far as it got
            link.heard_at = asyncio.get_running_loop().time()   # (closed on an error: quiet from now)
            self._inherit_dead()
            self._open_gates()

    def _lay_over(self, link, staging):
        replica = self._replicas.setdefault(link.epoch, _Replica())
        for correlation_id, entry in staging.items():
            if entry is None:
                replica.drop(link.number, correlation_id)    # finished on that connection
            else:
                replica.set(link.number, entry)
        self._drop_held(replica)

    def _drop_held(self, replica):
        for correlation_id in [cid for cid in replica.entries if self._store.held(cid) is not None]:
            replica.paid(correlation_id)

    def _handle(self, message, link):
        kind = message[0]
        writer = link.writer
        if kind == "I":
            epoch, number = message[1], message[2]
            if not isinstance(epoch, str) or not isinstance(number, int):
                raise ValueError("bad I line")
            link.epoch, link.number = epoch, number
            if epoch in self._gone and epoch not in self._dead_epochs:
                link.number = -1                    # its replica was inherited already: records only
            else:
                for gate in self._gates:            # a newer connection of an epoch waited for: its word too
                    if any(other.epoch == epoch for other in gate.links):
                        gate.links.add(link)
            self._peer_epoch_is(epoch)
            return
        if link.epoch is None:
            raise ValueError("%r before the I line" % kind)   # the connection is dropped
        if kind == "R":
            records = message[1]
            self._ingest(records, link)
            if link.staging is not None:            # its snapshot is on its way: its own order
                for entry in message[3]:
                    link.staging[entry_id(entry)] = entry
                for correlation_id in message[2]:
                    link.staging[correlation_id] = None    # finished (a snapshot cut short drops it too)
            elif link.number >= 0:
                replica = self._replicas.get(link.epoch)
                if replica is not None:
                    for entry in message[3]:
                        replica.set(link.number, entry)
                    for correlation_id in message[2]:
                        replica.drop(link.number, correlation_id)
            for record in records:                  # paid, wherever it was pending
                for epoch, replica in self._replicas.items():
                    replica.paid(record_correlation_id(record), link.number if epoch == link.epoch else 0)
            if message[3]:
                self._want_ack()                    # it accepted (or changed) payments: say we read them
            if len(message) > 4 and message[4]:     # what it has read of ours (absent when nothing)
                local = self._store.local_epoch
                for epoch, number, handled in message[4]:
                    if epoch == local and handled > link.acked.get(number, -1):
                        link.acked[number] = handled
                self._open_gates()
        elif kind == "W":
            self._want_ack()                        # a snapshot may carry payments held for our word
            if link.staging is None:
                link.staging = {}
            for entry in message[1]:
                link.staging[entry_id(entry)] = entry
        elif kind == "E":
            staging, link.staging = link.staging or {}, None
            if link.number < 0:
                return
            replica = self._replicas.setdefault(link.epoch, _Replica())
            replica.replace(link.number, {cid: entry for cid, entry in staging.items() if entry is not None})
            self._drop_held(replica)
            if link.epoch not in self._gone:
                self.synced = True
            self._open_gates()               # acknowledgements it sent while its snapshot was open count now
        elif kind == "S":
            self._on_health(message[1], message[2])
        elif kind == "P":
            if message[1] > self.purged_at:
                self._apply_purge(message[1])
        elif kind == "H":
            _, request_id, wires = message
            taken = self._on_adopt is not None and self._on_adopt(wires)
            replica = self._replicas.get(link.epoch)
            if taken and replica is not None:
                for wire in wires:
                    replica.paid(wire_id(wire), link.number)   # ours now, whatever any connection says
            writer.write(orjson.dumps(["h", request_id, bool(taken)], option=_LINE))
        elif kind == "L":
            writer.write(orjson.dumps(["l", message[1], self._on_lookup(message[2])], option=_LINE))

    def _ingest(self, records, link):
        """Records from the peer. Those a dead epoch still delivers (its connection read late) go
        on to its successor too, which its resync may have missed; and any payment a record
        settles is settled here too if this book holds a copy (on_settled)."""
        new = [record for record in records if self._store.ingest(*record)]
        self.records_received += len(new)
        if not new:
            return
        if link.epoch in self._gone:
            self._pass_on(new)
        if self._on_settled is not None:
            for record in new:
                self._on_settled(record)

    # ----- the peer's replica: inherited once its epoch is gone -----------------------
    @staticmethod
    def _started(epoch):
        """When an epoch started ("<instance>-<monotonic_ns>"): a later one replaces an earlier one."""
        return int(epoch.rsplit("-", 1)[1])

    def _peer_epoch_is(self, epoch):
        """The peer's process runs as `epoch`: every epoch that started before it is dead. An epoch
        known to be gone, or older than one known, says nothing (a late connection)."""
        if epoch in self._gone:
            return
        known = set(self._replicas) | {link.epoch for link in self._links if link.epoch is not None}
        if any(self._started(other) > self._started(epoch) for other in known):
            self._declare_dead({epoch})              # heard late: a newer one runs already
            return
        self._declare_dead({other for other in known if self._started(other) < self._started(epoch)})

    def _declare_dead(self, epochs):
        self._gone.update(epochs)
        self._dead_epochs.update(epochs)
        self._inherit_dead()

    def _inherit_dead(self):
        # Only once a dead epoch's connections have closed: every message it sent has been applied.
        # A connection that has not said which epoch it comes from may be one of them: wait.
        open_epochs = {link.epoch for link in self._links}
        if None in open_epochs:
            return
        for epoch in [e for e in self._dead_epochs if e not in open_epochs]:
            self._dead_epochs.discard(epoch)
            replica = self._replicas.pop(epoch, None)
            if replica is not None and replica.entries and self._on_inherit is not None:
                self._on_inherit(epoch, list(replica.entries.values()))

    def replica_size(self):
        return sum(len(replica.entries) for replica in self._replicas.values())

    def write_buffer(self):
        """Bytes written to the peer and still in this process (0 when the kernel took them all)."""
        return self._writer.transport.get_write_buffer_size() if self._writer is not None else 0

    def _apply_purge(self, purged_at):
        self.purged_at = purged_at
        self._on_purge(purged_at)         # records still to be sent are dropped by the peer's store


class _Incompatible(ValueError):
    """The peer speaks another protocol version."""
