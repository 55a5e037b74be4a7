"""Paid payments: a fixed-capacity ring of compact records, summarised fast.

A record is what a processor confirmed: requestedAt (integer ms, exactly as
the processor holds it), amount in integer cents, processor (0 default, 1
fallback), the correlationId, and where it came from (origin epoch + sequence
number) so that two instances can exchange records and resynchronise without
counting any twice; and when it was recorded (paid_at, ms, at the instance that
recorded it). As a tuple (the form the peer link carries):

    (epoch, seq, requested_at_ms, cents, processor, correlation_id, paid_at_ms)

The store holds at most one record per correlationId, whatever path a record
comes by (paid here, sent by the peer, resent in a resync): a second one is
refused, so a payment settled twice anywhere is still counted once.

A purge is a point in time: it removes every record paid before it, and keeps
refusing those however late they arrive (one still on the link); records paid
after it stay, also those paid before the purge reached this instance, and
those of payments accepted before it and paid after it (as the processors keep
what they store after their own purge). The outcome depends only on the record
and the purge, never on which arrives first, so two instances that see the same
purges hold the same records.

Summaries run on the event loop between payment requests, so their cost must
not grow with the number of stored payments. Records are aggregated into
100 ms buckets and 10 s blocks; a summary adds up the blocks and buckets that
lie wholly inside the range and looks at single records only in the two edge
buckets. Cost: O(span / 10 s + 200 + records in two 100 ms buckets).

When the ring is full the oldest record is overwritten and leaves every
aggregate; `overwritten` counts those (a wrap-around loses old history, which
is why the capacity default is far above a test's volume).
"""
from array import array

from timestamps import format_ms, now_ms

BUCKET_MS = 100          # fine level: edge buckets are scanned record by record
BUCKETS_PER_BLOCK = 100  # coarse level: a block is 10 s of buckets
DEFAULT, FALLBACK = 0, 1
PROCESSOR_NAMES = ("default", "fallback")
_FAR = 1 << 62


MARK_EVERY = 1024        # appends between two (wall clock, append index) marks (see purge)


def record_correlation_id(record):
    return record[5]


def record_processor(record):
    return record[4]


def record_requested_at(record):
    return record[2]


def record_cents(record):
    return record[3]


def cents_text(cents):
    """An amount in cents as the API writes it: 1990 -> "19.90"."""
    return "%d.%02d" % divmod(cents, 100)


def describe_record(record):
    """A record as JSON-ready fields (GET /admin/records)."""
    epoch, seq, requested_at_ms, cents, processor, correlation_id, paid_at_ms = record
    return {"correlationId": correlation_id, "processor": PROCESSOR_NAMES[processor],
            "requestedAt": format_ms(requested_at_ms), "amount": cents_text(cents),
            "paidAt": format_ms(paid_at_ms), "origin": epoch, "seq": seq}


class _Totals:
    """Counts and cents per processor for one bucket, block or the whole store."""
    __slots__ = ("count", "cents")

    def __init__(self):
        self.count = [0, 0]
        self.cents = [0, 0]

    def add(self, processor, cents, sign=1):
        self.count[processor] += sign
        self.cents[processor] += sign * cents

    def empty(self):
        return self.count[0] == 0 and self.count[1] == 0


class PaymentStore:
    def __init__(self, capacity, local_epoch):
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.local_epoch = local_epoch
        self._requested_at = array("q", bytes(8 * capacity))
        self._cents = array("q", bytes(8 * capacity))
        self._processor = array("b", bytes(capacity))
        self._origin = array("H", bytes(2 * capacity))
        self._seq = array("Q", bytes(8 * capacity))
        self._paid_at = array("q", bytes(8 * capacity))
        self._marks = []              # (wall clock ms, appended-index): what was appended before when
        # appended-index -> correlationId: a dict of ints and strings, which the garbage collector
        # does not track (a list of a million slots would be walked by every full collection).
        self._id_at = {}
        self._slot_of = {}            # correlationId -> appended-index of its record (held records only)
        self._appended = 0            # records ever written; slot = appended % capacity
        self._first_live = 0          # appended-index of the oldest record still held
        self._epochs = []             # origin index -> epoch name
        self._epoch_index = {}
        # Highest sequence number held (or purged) per origin epoch. Kept across
        # purges so that a peer cannot hand back what a purge removed.
        self._high_water = {}
        self._local_seq = 0
        self.purged_before = 0        # ms: records paid earlier are not held (purge)
        self._purges = 0
        self._buckets = {}            # bucket number -> (_Totals, array of slots)
        self._blocks = {}             # block number -> _Totals
        self._all = _Totals()
        self.overwritten = 0          # records lost to wrap-around (purges not counted)

    # ----- writing -------------------------------------------------------------------
    def record_local(self, correlation_id, requested_at_ms, cents, processor):
        """Store a payment this instance had confirmed; the record (for the peer), or None when
        a record of this correlationId is already held."""
        paid_at_ms = now_ms()
        if correlation_id in self._slot_of or paid_at_ms < self.purged_before:
            return None
        self._local_seq += 1
        record = (self.local_epoch, self._local_seq, requested_at_ms, cents, processor, correlation_id, paid_at_ms)
        self._append(*record)
        return record

    def ingest(self, epoch, seq, requested_at_ms, cents, processor, correlation_id, paid_at_ms):
        """Store a record from the peer; True if it was new. One already held (by its name or by its
        correlationId), or paid before a purge, is refused, but still counts as seen for the
        high-water mark."""
        if seq <= self._high_water.get(epoch, 0):
            return False
        if correlation_id in self._slot_of or paid_at_ms < self.purged_before:
            self._high_water[epoch] = seq
            return False
        self._append(epoch, seq, requested_at_ms, cents, processor, correlation_id, paid_at_ms)
        return True

    def held(self, correlation_id):
        """(requested_at_ms, cents, processor) of the record of this correlationId, or None."""
        index = self._slot_of.get(correlation_id)
        if index is None:
            return None
        slot = index % self.capacity
        return self._requested_at[slot], self._cents[slot], self._processor[slot]

    def _append(self, epoch, seq, requested_at_ms, cents, processor, correlation_id, paid_at_ms):
        if self._appended - self._first_live == self.capacity:
            self._evict_oldest()
        if self._appended % MARK_EVERY == 0:
            self._marks.append((now_ms(), self._appended))
            if len(self._marks) > 2 * (self.capacity // MARK_EVERY + 1):
                del self._marks[:len(self._marks) // 2]   # those of long-overwritten records
        origin = self._epoch_index.get(epoch)
        if origin is None:
            origin = self._epoch_index[epoch] = len(self._epochs)
            self._epochs.append(epoch)
        slot = self._appended % self.capacity
        self._slot_of[correlation_id] = self._appended
        self._appended += 1
        self._id_at[self._appended - 1] = correlation_id
        self._paid_at[slot] = paid_at_ms
        self._requested_at[slot] = requested_at_ms
        self._cents[slot] = cents
        self._processor[slot] = processor
        self._origin[slot] = origin
        self._seq[slot] = seq
        if seq > self._high_water.get(epoch, 0):
            self._high_water[epoch] = seq
        bucket_no = requested_at_ms // BUCKET_MS
        entry = self._buckets.get(bucket_no)
        if entry is None:
            entry = self._buckets[bucket_no] = (_Totals(), array("I"))
        entry[0].add(processor, cents)
        entry[1].append(slot)
        block_no = bucket_no // BUCKETS_PER_BLOCK
        block = self._blocks.get(block_no)
        if block is None:
            block = self._blocks[block_no] = _Totals()
        block.add(processor, cents)
        self._all.add(processor, cents)

    def _evict_oldest(self):
        slot = self._first_live % self.capacity
        del self._slot_of[self._id_at.pop(self._first_live)]
        self._first_live += 1
        self.overwritten += 1
        requested_at_ms = self._requested_at[slot]
        cents, processor = self._cents[slot], self._processor[slot]
        bucket_no = requested_at_ms // BUCKET_MS
        totals, slots = self._buckets[bucket_no]
        # The oldest record overall is also the oldest written into its bucket.
        assert slots[0] == slot
        del slots[0]
        totals.add(processor, cents, -1)
        if not slots:
            del self._buckets[bucket_no]
        block_no = bucket_no // BUCKETS_PER_BLOCK
        block = self._blocks[block_no]
        block.add(processor, cents, -1)
        if block.empty():
            del self._blocks[block_no]
        self._all.add(processor, cents, -1)

    def purge(self, before_ms):
        """Forget every record paid before before_ms, now and when one arrives later (sequence
        watermarks stay, see _high_water). Those paid after it are kept: few, the purge being
        recent; only what was appended since the last mark before it is looked at (anything
        appended earlier was paid earlier)."""
        if before_ms <= self.purged_before:
            return
        self.purged_before = before_ms
        self._purges += 1
        start = self._first_live
        for wall_ms, index in reversed(self._marks):
            if wall_ms < before_ms:
                start = max(start, index)
                break
        survivors = [record for record in self._records_between(start, self._appended, {})
                     if record[6] >= before_ms]
        self._first_live = self._appended
        self._slot_of.clear()
        self._id_at.clear()
        self._buckets.clear()
        self._blocks.clear()
        self._all = _Totals()
        for record in survivors:
            self._append(*record)

    # ----- reading -------------------------------------------------------------------
    def summary(self, from_ms=None, to_ms=None):
        """Totals per processor for from_ms <= requestedAt <= to_ms (None = unbounded)."""
        if from_ms is None and to_ms is None:
            return self._copy(self._all)
        lo = -_FAR if from_ms is None else from_ms
        hi = _FAR if to_ms is None else to_ms
        result = _Totals()
        if lo > hi:
            return result
        first, last = lo // BUCKET_MS, hi // BUCKET_MS
        self._add_edge(result, first, lo, hi)
        if last != first:
            self._add_edge(result, last, lo, hi)
            self._add_buckets_between(result, first + 1, last - 1)
        return result

    def _add_edge(self, result, bucket_no, lo, hi):
        entry = self._buckets.get(bucket_no)
        if entry is None:
            return
        requested_at, cents, processor = self._requested_at, self._cents, self._processor
        for slot in entry[1]:
            if lo <= requested_at[slot] <= hi:
                result.add(processor[slot], cents[slot])

    def _add_buckets_between(self, result, first, last):
        if first > last:
            return
        first_block = -(-first // BUCKETS_PER_BLOCK)          # first block wholly inside
        last_block = (last + 1) // BUCKETS_PER_BLOCK - 1      # last block wholly inside
        if first_block > last_block:
            self._add_range(result, self._buckets, first, last, lambda e: e[0])
            return
        self._add_range(result, self._buckets, first, first_block * BUCKETS_PER_BLOCK - 1, lambda e: e[0])
        self._add_range(result, self._blocks, first_block, last_block, lambda e: e)
        self._add_range(result, self._buckets, (last_block + 1) * BUCKETS_PER_BLOCK, last, lambda e: e[0])

    @staticmethod
    def _add_range(result, table, first, last, totals_of):
        """Add table[k] for first <= k <= last, by lookup or by scan, whichever is shorter."""
        if first > last:
            return
        if last - first + 1 <= len(table):
            entries = (table.get(k) for k in range(first, last + 1))
        else:
            entries = (v for k, v in table.items() if first <= k <= last)
        for entry in entries:
            if entry is not None:
                totals = totals_of(entry)
                result.count[0] += totals.count[0]
                result.count[1] += totals.count[1]
                result.cents[0] += totals.cents[0]
                result.cents[1] += totals.cents[1]

    @staticmethod
    def _copy(totals):
        result = _Totals()
        result.count = list(totals.count)
        result.cents = list(totals.cents)
        return result

    # ----- exchange with the peer ----------------------------------------------------
    def high_water(self):
        """What this store holds, per origin epoch: the peer sends only what lies above."""
        return dict(self._high_water)

    def records_above(self, peer_high_water):
        """Held records the peer lacks, oldest first, as record tuples (see the module's docstring).

        The range is fixed now: records written later travel on the live path.
        """
        return self._records_between(self._first_live, self._appended, peer_high_water)

    def records_above_in_steps(self, peer_high_water, step=10_000):
        """records_above, as a list of what each `step` held records scanned found (often empty):
        the caller yields to the event loop between them, whatever the peer lacks."""
        end = self._appended
        purges = self._purges
        index = self._first_live
        while index < end:
            index = max(index, self._first_live)
            upto = min(end, index + step)
            yield list(self._records_between(index, upto, peer_high_water))
            index = upto
            if self._purges != purges:       # its survivors were appended again, past `end`
                purges, end = self._purges, self._appended

    def _records_between(self, start, end, peer_high_water):
        epochs = self._epochs
        index = start
        while index < end:
            index = max(index, self._first_live)    # skip what was overwritten or purged meanwhile
            if index >= end:
                return
            slot = index % self.capacity
            epoch = epochs[self._origin[slot]]
            seq = self._seq[slot]
            if seq > peer_high_water.get(epoch, 0):
                yield (epoch, seq, self._requested_at[slot], self._cents[slot], self._processor[slot],
                       self._id_at[index], self._paid_at[slot])
            index += 1

    def records_page(self, offset, limit):
        """Up to `limit` held records, oldest first, from the offset-th: (records, next offset or None)."""
        start = self._first_live + offset
        end = min(self._appended, start + limit)
        page = list(self._records_between(start, end, {}))
        return page, (offset + limit if end < self._appended else None)

    # ----- figures -------------------------------------------------------------------
    def __len__(self):
        return self._appended - self._first_live

