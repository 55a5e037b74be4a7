"""The peer link in process: real PeerLinks and PaymentStores on real Unix sockets, the other side
played by a raw socket that speaks the protocol line by line, so that the order in which one
instance reads its peer's connections can be chosen exactly (on a slow link they interleave).

Found by the third review of the exactly-once path (docs/RELIABILITY.md, B28 and B29).
"""
import asyncio
import types

import orjson
import pytest

from payments import Payment, left_behind, replica_entry
from peer import PeerLink
from store import PaymentStore
from timestamps import now_ms

DEAD = "1-100"          # an epoch of instance 1 that is killed
SUCCESSOR = "1-200"     # instance 1 restarted
SURVIVOR = "2-50"       # instance 2


def make_link(listen, connect, store, inherited=None):
    settings = types.SimpleNamespace(peer_listen=listen, peer_connect=connect, peer_stall_s=5.0,
                                     peer_sync_timeout_s=10.0)
    return PeerLink(settings, store, on_purge=store.purge, on_health=lambda *a: None, on_lookup=lambda k: None,
                    on_adopt=lambda wires: True, pending=lambda: [],
                    on_inherit=lambda epoch, entries: (inherited if inherited is not None else []).extend(entries),
                    on_settled=lambda record: None)


async def start_survivor(paths, inherited=None, store=None):
    """The instance that outlives the other (its socket is paths[1], it dials paths[0])."""
    a_sock, b_sock = paths
    survivor = make_link(b_sock, a_sock, store if store is not None else PaymentStore(1000, SURVIVOR), inherited)
    await survivor.start()
    return survivor


async def connection_of(epoch, number, path):
    """A connection of a peer epoch, said hello to."""
    raw = RawEpoch(epoch, number)
    await raw.connect(path)
    return raw

def ids(entries):
    return sorted(e[0][0] for e in entries)


async def successor_arrives(a_sock, b_sock):
    successor = make_link(a_sock, b_sock, PaymentStore(1000, SUCCESSOR))
    await successor.start()
    await settle()
    return successor


async def successor_arrives_then_close(paths, survivor):
    """The dead epoch's successor says hello (the dead epoch is known dead); then both close."""
    a_sock, b_sock = paths
    successor = await successor_arrives(a_sock, b_sock)
    await survivor.close()
    await successor.close()


class RawEpoch:
    """One connection of an epoch of the peer, written by hand."""

    def __init__(self, epoch, number):
        self.epoch, self.number = epoch, number

    async def connect(self, path):
        self.reader, self.writer = await asyncio.open_unix_connection(path, limit=1 << 24)
        await self.reader.readline()                      # the hello
        self.send(["I", self.epoch, self.number])

    def send(self, message):
        self.writer.write(orjson.dumps(message) + b"\n")

    async def say(self, *messages):
        """Send these lines, and let the other side read them."""
        for message in messages:
            self.send(message)
        await self.writer.drain()
        await settle()

    async def close(self):
        await self.writer.drain()
        self.writer.close()


def record(seq, epoch=DEAD):
    return [epoch, seq, now_ms() - 1000, 1990, 0, "00000000-0000-0000-0000-%012d" % seq, now_ms()]


def pending(n):
    return Payment("11111111-1111-1111-1111-%012d" % n, 1990, 0.0)


async def settle():
    await asyncio.sleep(0.1)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture
def paths(short_dir):
    return short_dir + "/a.sock", short_dir + "/b.sock"


def test_records_a_dead_epoch_delivers_late_go_to_its_successor_behind_the_resync(paths):
    """The survivor holds 20,000 records of a dead epoch and is resynchronising its restarted
    successor (in chunks, over several loop steps) when the dead epoch's last records are read.
    Passed on at once, they would overtake the resync, and the successor's store, which takes an
    epoch's records only in order, would refuse every earlier one for good."""
    a_sock, b_sock = paths

    async def main():
        survivor_store = PaymentStore(100_000, SURVIVOR)
        survivor = make_link(b_sock, a_sock, survivor_store)
        await survivor.start()
        dead = await connection_of(DEAD, 1, b_sock)
        total = 20_000
        for start in range(1, total + 1, 2000):
            dead.send(["R", [record(s) for s in range(start, start + 2000)], [], []])
        await dead.writer.drain()
        while len(survivor_store) < total:
            await asyncio.sleep(0.01)
        successor_store = PaymentStore(100_000, SUCCESSOR)
        successor = make_link(a_sock, b_sock, successor_store)
        await successor.start()
        while not survivor._syncing:
            await asyncio.sleep(0)
        for seq in range(total + 1, total + 201):          # the dead epoch's tail, read during the resync
            dead.send(["R", [record(seq)], [], []])
            await asyncio.sleep(0.0005)
        await dead.close()
        for _ in range(100):
            if len(successor_store) == total + 200:
                break
            await asyncio.sleep(0.05)
        held = {seq for (_, seq, *_) in successor_store.records_above({})}
        await survivor.close()
        await successor.close()
        return len(survivor_store), held

    survivor_holds, successor_holds = run(main())
    assert survivor_holds == 20_200
    assert successor_holds == set(range(1, 20_201)), "the successor lacks %d records" % (
        20_200 - len(successor_holds))


def test_a_dead_epochs_last_attempt_read_late_is_inherited_with_it(paths):
    """The dead epoch's last line, read after its successor said hello, announces an attempt at the
    fallback. The survivor inherits the payment pinned to the fallback (as after an ambiguous
    attempt), never as a payment nobody tried: paying it at the default would pay it twice."""
    a_sock, b_sock = paths

    async def main():
        inherited = []
        survivor = await start_survivor(paths, inherited)
        dead = await connection_of(DEAD, 1, b_sock)
        payment = pending(1)
        await dead.say(["W", [replica_entry(payment)]], ["E", DEAD])
        successor = make_link(a_sock, b_sock, PaymentStore(1000, SUCCESSOR))
        await successor.start()
        await settle()                                     # the successor has said hello
        payment.requested_at[1] = 1752150896789
        payment.attempts = 1
        payment.in_flight_to = 1
        dead.send(["R", [], [], [replica_entry(payment)]])
        await dead.close()
        await settle()
        await survivor.close()
        await successor.close()
        return inherited

    inherited = run(main())
    assert len(inherited) == 1
    adopted = left_behind(inherited[0], 0.0)
    assert adopted.pinned == 1
    assert adopted.requested_at[1] == 1752150896789


def test_a_snapshot_cut_short_by_the_senders_death_is_inherited(paths):
    """The sender dies while its snapshot is on its way: the chunks that arrived, and a payment
    accepted meanwhile (its 202 was written once the acceptance was in the kernel), are inherited,
    not dropped with the unfinished snapshot."""
    a_sock, b_sock = paths

    async def main():
        inherited = []
        survivor = await start_survivor(paths, inherited)
        dead = await connection_of(DEAD, 1, b_sock)
        dead.send(["W", [replica_entry(pending(1))]])
        dead.send(["R", [], [], [replica_entry(pending(2))]])
        await dead.close()                                   # no "E": it died
        await settle()
        await successor_arrives_then_close(paths, survivor)
        return inherited

    inherited = run(main())
    assert sorted(entry[0][0] for entry in inherited) == [pending(1).correlation_id, pending(2).correlation_id]


def test_an_older_connections_tail_applies_until_a_newer_snapshot_replaces_the_copy(paths):
    """Two connections of one epoch, read interleaved. What the first still brings before the
    second's "E" is applied (a payment accepted on it is not lost if the second never finishes);
    after the second's "E", it is older than that snapshot and is dropped (it would bring back a
    payment that has finished since)."""
    a_sock, b_sock = paths

    async def main():
        inherited = []
        survivor = await start_survivor(paths, inherited)
        first = await connection_of(DEAD, 1, b_sock)
        await first.say(["W", [replica_entry(pending(1))]], ["E", DEAD])
        second = await connection_of(DEAD, 2, b_sock)
        await settle()
        await first.say(["R", [], [], [replica_entry(pending(2))]])   # before the second's "E": applies
        await second.say(["W", [replica_entry(pending(2)), replica_entry(pending(3))]], ["E", DEAD])
        first.send(["R", [], [], [replica_entry(pending(1))]])     # after it: older news, dropped
        await first.close()
        await second.close()
        await settle()
        copy_before_death = sorted(pending(n).correlation_id for n in (1, 2, 3)
                                   if survivor.pending_cents(pending(n).correlation_id) is not None)
        await successor_arrives_then_close(paths, survivor)
        return copy_before_death, inherited

    copy, inherited = run(main())
    assert copy == [pending(2).correlation_id, pending(3).correlation_id]
    assert sorted(entry[0][0] for entry in inherited) == copy


def test_an_older_connections_tail_is_kept_when_the_newer_snapshot_never_ends(paths):
    """As above, but the second connection's sender dies before its "E": the payment accepted on
    the first connection (its 202 written) is still inherited."""
    a_sock, b_sock = paths

    async def main():
        inherited = []
        survivor = await start_survivor(paths, inherited)
        first = await connection_of(DEAD, 1, b_sock)
        await first.say(["W", [replica_entry(pending(1))]], ["E", DEAD])
        second = await connection_of(DEAD, 2, b_sock)
        await second.say(["W", [replica_entry(pending(1))]])
        first.send(["R", [], [], [replica_entry(pending(2))]])
        await first.close()
        await second.close()                                 # died before its "E"
        await settle()
        await successor_arrives_then_close(paths, survivor)
        return inherited

    inherited = run(main())
    assert sorted(entry[0][0] for entry in inherited) == [pending(1).correlation_id, pending(2).correlation_id]


# ----- found by the review of the fix (B31) ---------------------------------------------------


def test_an_older_connections_end_read_late_keeps_what_a_newer_cut_short_snapshot_said(paths):
    """Connection 1's "E" (written before connection 2 existed) is read after connection 2, cut
    short by the sender's death, was laid over the copy: what only connection 2 carried (p2 in
    its snapshot, p3 accepted meanwhile, its 202 written) is newer, and is inherited."""
    a_sock, b_sock = paths

    async def main():
        inherited = []
        survivor = await start_survivor(paths, inherited)
        first = await connection_of(DEAD, 1, b_sock)
        await first.say(["W", [replica_entry(pending(1))]])   # its E still unread
        second = await connection_of(DEAD, 2, b_sock)
        second.send(["W", [replica_entry(pending(1)), replica_entry(pending(2))]])
        second.send(["R", [], [], [replica_entry(pending(3))]])
        await second.close()                                 # died before its E
        await settle()
        first.send(["E", DEAD])                               # conn 1's tail, read late
        await first.close()
        await settle()
        await successor_arrives_then_close(paths, survivor)
        return inherited

    inherited = run(main())
    assert ids(inherited) == sorted(pending(n).correlation_id for n in (1, 2, 3))


def test_an_older_connections_update_read_late_never_overrides_a_newer_attempt(paths):
    """Connection 2's cut-short snapshot says p1 is being attempted at the fallback; connection
    1's tail, read after that, carries p1's older entry (claimed for the default). p1 is
    inherited pinned to the fallback: the older word would let it be paid at both."""
    a_sock, b_sock = paths

    async def main():
        inherited = []
        survivor = await start_survivor(paths, inherited)
        first = await connection_of(DEAD, 1, b_sock)
        await first.say(["W", []], ["E", DEAD])
        old = pending(1)
        old.in_flight_to = 0  # accepted, claimed for the default
        new = pending(1)
        new.attempts = 1
        new.requested_at[1] = 1752150896789
        new.in_flight_to = 1
        second = await connection_of(DEAD, 2, b_sock)
        second.send(["W", [replica_entry(new)]])
        await second.close()                                 # died before its E
        await settle()
        first.send(["R", [], [], [replica_entry(old)]])       # conn 1's tail, read late
        await first.close()
        await settle()
        await successor_arrives_then_close(paths, survivor)
        return inherited

    inherited = run(main())
    adopted = left_behind(inherited[0], 0.0)
    assert adopted.pinned == 1 and adopted.requested_at[1] == 1752150896789


def test_an_older_cut_short_snapshot_never_overrides_a_newer_one(paths):
    """Both snapshots cut short, the older connection closing last: the newer one's attempt state
    is what is inherited."""
    a_sock, b_sock = paths

    async def main():
        inherited = []
        survivor = await start_survivor(paths, inherited)
        old = pending(1)
        old.in_flight_to = 0
        new = pending(1)
        new.attempts = 1
        new.requested_at[1] = 1752150896789
        new.in_flight_to = 1
        first = await connection_of(DEAD, 1, b_sock)
        await first.say(["W", [replica_entry(old)]])
        second = await connection_of(DEAD, 2, b_sock)
        second.send(["W", [replica_entry(new)]])
        await second.close()
        await settle()
        await first.close()
        await settle()
        await successor_arrives_then_close(paths, survivor)
        return inherited

    inherited = run(main())
    adopted = left_behind(inherited[0], 0.0)
    assert adopted.pinned == 1


def test_an_epoch_first_heard_after_a_newer_one_is_dead_and_inherited(paths):
    """An epoch older than one already known is first heard late: it is dead (a newer one runs),
    and what it left pending is inherited once its connection closes, not kept for ever."""
    a_sock, b_sock = paths

    async def main():
        inherited = []
        survivor = await start_survivor(paths, inherited)
        newer = await connection_of(SUCCESSOR, 1, b_sock)
        await newer.say(["E", SUCCESSOR])
        older = await connection_of(DEAD, 1, b_sock)
        older.send(["W", [replica_entry(pending(1))]])
        older.send(["E", DEAD])
        await older.close()
        await settle()
        await newer.close()
        await survivor.close()
        return inherited

    inherited = run(main())
    assert ids(inherited) == [pending(1).correlation_id]


def test_a_message_before_the_i_line_drops_that_connection_only(paths):
    """A connection that breaks the protocol (a snapshot before its "I") is dropped, and nothing
    else: the link to a real peer still comes up."""
    a_sock, b_sock = paths

    async def main():
        survivor = make_link(b_sock, a_sock, PaymentStore(1000, SURVIVOR))
        await survivor.start()
        r, w = await asyncio.open_unix_connection(b_sock)
        await r.readline()
        w.write(b'["W",[]]\n')
        await w.drain()
        w.close()
        await settle()
        successor = await successor_arrives(a_sock, b_sock)
        await asyncio.sleep(0.5)
        state = (survivor.link_up, successor.synced)
        await survivor.close()
        await successor.close()
        return state

    assert run(main()) == (True, True)


# ----- found by a fresh reader of the books ----------------------------------------------------

def test_a_payment_paid_on_a_newer_connection_is_not_brought_back_by_an_older_one(paths):
    """Connection 2 brings X's record; connection 1's older line announcing X, read after it, must
    not put X back among the pending (after a purge nothing else would stop it being paid again)."""
    x = pending(1)

    async def main():
        survivor = await start_survivor(paths, [])
        first = await connection_of(DEAD, 1, paths[1])
        await first.say(["W", [replica_entry(x)]], ["E", DEAD])
        second = await connection_of(DEAD, 2, paths[1])
        paid = record(1)
        paid[5] = x.correlation_id
        await second.say(["R", [paid], [], []])
        await first.say(["R", [], [], [replica_entry(x)]])
        pending_after = survivor.pending_cents(x.correlation_id)
        await first.close()
        await second.close()
        await survivor.close()
        return pending_after

    assert run(main()) is None


def test_a_snapshot_cut_short_keeps_the_ends_its_own_connection_announced(paths):
    """Connection 2 snapshots X, then says X is finished (dead-lettered), and dies before its "E":
    the older copy's X is not inherited as if it were still pending."""
    x = pending(7)

    async def main():
        inherited = []
        survivor = await start_survivor(paths, inherited)
        first = await connection_of(DEAD, 1, paths[1])
        await first.say(["W", [replica_entry(x)]], ["E", DEAD])
        await first.close()
        second = await connection_of(DEAD, 2, paths[1])
        await second.say(["W", [replica_entry(x)]], ["R", [], [x.correlation_id], []])
        await second.close()
        await settle()
        await successor_arrives_then_close(paths, survivor)
        return inherited

    assert run(main()) == []
