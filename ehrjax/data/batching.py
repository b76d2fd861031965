"""Device-resident batches of static shape: packing, length buckets or pad-to-max, gathered on the device.

The tokenised corpus goes to the device once (`to_device`). Once per epoch a numpy *plan* decides which
patient sits where: per batch, `patient_index` and `cls_index` int32[rows, slots] (patient `-1` and
position 0 for an empty slot). A batch is then a jitted gather from the corpus (`batch_at`), so the host
never touches tokens during training and a `lax.fori_loop` over batch indices is possible.

Modes (`data.batching`):
- `pack` (default): patients packed into rows of `row_len` tokens, at most `slots_per_row` per row, largest
  first (see `pack_rows`); `rows_per_batch` rows per batch; one shape.
- `bucket`: one patient per row, rows of the smallest power-of-two bucket (from `bucket_min_len`) holding it,
  `tokens_per_batch // bucket` rows per batch; one shape per bucket. A bucket's last, partial batch moves up
  into the next bucket, so only the largest bucket has one.
- `pad_max`: one patient per row of `max_len` tokens, `batch_size` rows per batch (the reference study).
- `pack_buckets`: packing into rows of several lengths (`pack_row_lengths`: powers of two from
  `pack_min_len`, then `row_len`), `tokens_per_batch // length` rows per batch; one shape per row length. A
  patient longer than the next shorter row length goes to rows of this length; the gaps of those rows are
  then filled with shorter patients (free: the slots are computed anyway), and what is left goes down to the
  next length (see `pack_row_classes`). Short rows make attention, which a packed row pays over its whole
  length, cheaper while packing keeps padding low.

In a row, slots are laid out back to back from position 0 in slot order, then padding. The last partial batch
of a group is filled with empty rows, so every patient appears exactly once per epoch at a static shape.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ehrjax.data.tokenize import TokenizedCorpus
from ehrjax.data.vocab import PAD
from ehrjax.multihost import put_global

MODES: tuple[str, ...] = ("pack", "bucket", "pad_max", "pack_buckets")
DATA_AXIS = "data"
Batch = dict[str, jax.Array]


def bucket_lengths(max_len: int, min_len: int = 8) -> tuple[int, ...]:
    """Bucket row lengths: powers of two from `min_len` up to the first one >= `max_len`."""
    if min_len < 1 or min_len & (min_len - 1):
        raise ValueError(f"data.bucket_min_len must be a power of two >= 1, got {min_len}")
    out = [min_len]
    while out[-1] < max_len:
        out.append(2 * out[-1])
    return tuple(out)


def _bfd_sorted(
    lengths: np.ndarray, row_len: int, slots: int, free0: np.ndarray | None = None, used0: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Best-fit decreasing over lengths already sorted in decreasing order, into rows that may already be
    partly filled (`free0` free tokens and `used0` used slots per existing row; new rows follow them).

    Returns (row, slot, start) int64[n] per item and the number of rows. Items of equal length are placed in
    bulk: open rows are kept in classes by free capacity, and the items of one length fill the rows of the
    tightest class that fits (each row takes as many as fit), then the next class, then new rows. The Python
    loop runs over (length, capacity class) pairs, never over items or tokens.
    """
    n = len(lengths)
    existing = 0 if free0 is None else len(free0)
    row = np.empty(n, dtype=np.int64)
    slot = np.empty(n, dtype=np.int64)
    start = np.empty(n, dtype=np.int64)
    free = np.empty(existing + n, dtype=np.int64)  # free tokens of each row opened so far
    used = np.empty(existing + n, dtype=np.int64)  # slots used of each row
    classes: list[list[np.ndarray]] = [[] for _ in range(row_len + 1)]  # open rows by free capacity
    class_size = np.zeros(row_len + 1, dtype=np.int64)
    num_rows = existing

    def push(rows: np.ndarray) -> None:
        rows = rows[(used[rows] < slots) & (free[rows] > 0)]
        if len(rows) == 0:
            return
        caps = free[rows]
        order = np.argsort(caps, kind="stable")
        values, first, counts = np.unique(caps[order], return_index=True, return_counts=True)
        for c, a, k in zip(values.tolist(), first.tolist(), counts.tolist(), strict=True):
            classes[c].append(rows[order[a : a + k]])
            class_size[c] += k

    if existing:
        free[:existing], used[:existing] = free0, used0
        push(np.arange(existing, dtype=np.int64))
    change = np.flatnonzero(np.diff(lengths)) + 1
    group_starts = np.concatenate([[0], change]).tolist()
    group_ends = np.concatenate([change, [n]]).tolist()
    for a, end in zip(group_starts, group_ends, strict=True):
        length = int(lengths[a])
        while a < end:
            k = end - a
            fits = np.flatnonzero(class_size[length:])
            if len(fits) == 0:
                per_row = min(slots, row_len // length)
                new = -(-k // per_row)
                t = np.arange(k, dtype=np.int64)
                row[a:end] = num_rows + t // per_row
                slot[a:end] = t % per_row
                start[a:end] = (t % per_row) * length
                fill = np.full(new, per_row, dtype=np.int64)
                fill[-1] = k - (new - 1) * per_row
                rows = np.arange(num_rows, num_rows + new, dtype=np.int64)
                free[rows] = row_len - fill * length
                used[rows] = fill
                num_rows += new
                push(rows)
                break
            c = length + int(fits[0])
            rows = np.concatenate(classes[c])
            classes[c] = []
            class_size[c] = 0
            take = np.minimum(slots - used[rows], c // length)
            cum = np.cumsum(take)
            u = min(int(np.searchsorted(cum, k)) + 1, len(rows))
            take = take[:u]
            take[-1] -= max(int(cum[u - 1]) - k, 0)
            placed = int(take.sum())
            item_rows = np.repeat(rows[:u], take)
            within = np.arange(placed, dtype=np.int64) - np.repeat(np.cumsum(take) - take, take)
            row[a : a + placed] = item_rows
            slot[a : a + placed] = used[item_rows] + within
            start[a : a + placed] = row_len - free[item_rows] + within * length
            free[rows[:u]] -= take * length
            used[rows[:u]] += take
            push(rows[:u])
            if u < len(rows):
                classes[c].append(rows[u:])
                class_size[c] += len(rows) - u
            a += placed
    return row, slot, start, num_rows


def _spread_sorted(
    lengths: np.ndarray, row_len: int, slots: int, num_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Worst-fit decreasing into `num_rows` rows, then best-fit decreasing for what does not fit.

    Lengths sorted in decreasing order are dealt in rounds: the next `num_rows` items go, largest first, to
    the rows with the most free room (one item per row per round, so this is LPT scheduling vectorised per
    round). Loads stay balanced, so every row keeps room for the short patients at the end; an item that does
    not fit its row waits for `_bfd_sorted`, which fills the remaining gaps and opens rows as needed.
    """
    n = len(lengths)
    row = np.full(n, -1, dtype=np.int64)
    slot = np.zeros(n, dtype=np.int64)
    start = np.zeros(n, dtype=np.int64)
    free = np.full(num_rows, row_len, dtype=np.int64)
    used = np.zeros(num_rows, dtype=np.int64)
    pending = np.arange(n)
    left: list[np.ndarray] = []
    while len(pending):
        open_rows = np.flatnonzero((used < slots) & (free >= lengths[pending[-1]]))
        if len(open_rows) == 0:
            break
        open_rows = open_rows[np.argsort(-free[open_rows], kind="stable")]
        k = min(len(open_rows), len(pending))
        items, rows = pending[:k], open_rows[:k]
        fit = lengths[items] <= free[rows]
        missed = items[~fit]
        too_long = lengths[missed] > free[open_rows[0]]  # fits no open row: best-fit decreasing takes it
        left.append(missed[too_long])
        pending = np.concatenate([missed[~too_long], pending[k:]])
        items, rows = items[fit], rows[fit]
        row[items], slot[items], start[items] = rows, used[rows], row_len - free[rows]
        free[rows] -= lengths[items]
        used[rows] += 1
        if len(items) < k // 64:
            break  # the rows are nearly full: best-fit decreasing finishes faster
    rest = np.concatenate([*left, pending])
    if len(rest):
        rest = rest[np.argsort(-lengths[rest], kind="stable")]
        row[rest], slot[rest], start[rest], num_rows = _bfd_sorted(lengths[rest], row_len, slots, free, used)
    kept_rows, row = np.unique(row, return_inverse=True)  # drop rows left empty by a generous target
    return row, slot, start, len(kept_rows)


def _pack_sorted(lengths: np.ndarray, row_len: int, slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The fewest rows among best-fit decreasing and `_spread_sorted` at target fills from tight to loose
    (stopping at the first target met without extra rows: looser ones cannot do better)."""
    best = _bfd_sorted(lengths, row_len, slots)
    lower = max(-(-int(lengths.sum()) // row_len), -(-len(lengths) // slots), 1)
    for fill in (1.0, 0.998, 0.995, 0.99, 0.98, 0.96):
        target = max(lower, math.ceil(lower / fill))
        if target >= best[3]:
            break
        candidate = _spread_sorted(lengths, row_len, slots, target)
        if candidate[3] < best[3]:
            best = candidate
        if candidate[3] == target:
            break
    return best


def pack_rows(lengths: np.ndarray, row_len: int, slots_per_row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Pack items of `lengths` into rows of `row_len` tokens with at most `slots_per_row` items per row.

    Items go in decreasing length (ties in input order, so a shuffled input gives a shuffled tie-break). Plain
    first/best-fit decreasing strands the many short patients at the end in rows whose slots run out long
    before their tokens do (0.94 efficiency at row_len 256 with 16 slots on the synthetic cohort), so the
    packer also tries spreading the items worst-fit over the target number of rows first, keeping room for
    the short ones everywhere, and keeps whichever needs fewer rows (0.99 there). The result depends only on
    the multiset of lengths, so the number of rows is the same every epoch. Returns (row, slot, start)
    int64[n] in input order and the number of rows; slots of a row are back to back from position 0.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if slots_per_row < 1:
        raise ValueError(f"data.slots_per_row must be >= 1, got {slots_per_row}")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > row_len):
        raise ValueError(
            f"data.row_len ({row_len}) must hold every item; lengths span {lengths.min()}..{lengths.max()}"
        )
    order = np.argsort(-lengths, kind="stable")
    row_s, slot_s, start_s, num_rows = _pack_sorted(lengths[order], row_len, slots_per_row)
    row, slot, start = (np.empty_like(row_s) for _ in range(3))
    row[order], slot[order], start[order] = row_s, slot_s, start_s
    return row, slot, start, num_rows


def pack_row_lengths(row_len: int, min_len: int) -> tuple[int, ...]:
    """Row lengths of `pack_buckets`: `min_len`, doubling while below `row_len`, then `row_len` itself."""
    if not isinstance(min_len, int) or not 1 <= min_len <= row_len:
        raise ValueError(f"data.pack_min_len must be an integer in [1, data.row_len={row_len}], got {min_len!r}")
    out = [min_len]
    while 2 * out[-1] < row_len:
        out.append(2 * out[-1])
    if out[-1] != row_len:
        out.append(row_len)
    return tuple(out)


_FILL_ROUNDS = 8  # best-fit passes over the leftovers into a class's gaps (the last ones place almost nothing)


def _pack_classes_sorted(
    lengths: np.ndarray, row_lengths: tuple[int, ...], slots: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]:
    """Pack lengths sorted in decreasing order into rows of several lengths, longest rows first.

    Rows of length L take every item longer than the next shorter row length (they fit nowhere else), packed
    by `_pack_sorted`; best-fit decreasing then fills their gaps with the shorter items (existing rows only),
    and the items left over go on to the next shorter length, whose rows take all that remain at the end.
    Returns per row length (item, row, slot, start, num_rows), `item` indexing `lengths`.
    """
    remaining = np.arange(len(lengths))
    out = []
    for k in range(len(row_lengths) - 1, -1, -1):
        row_len = row_lengths[k]
        shorter = row_lengths[k - 1] if k else 0
        must = remaining[lengths[remaining] > shorter]
        rest = remaining[lengths[remaining] <= shorter]
        if len(must) == 0:
            out.append((must, must, must, must, 0))
            continue
        row, slot, start, num_rows = _pack_sorted(lengths[must], row_len, slots)
        free = row_len - np.bincount(row, weights=lengths[must], minlength=num_rows).astype(np.int64)
        used = np.bincount(row, minlength=num_rows).astype(np.int64)
        pieces = [(must, row, slot, start)]
        for _ in range(_FILL_ROUNDS):
            if len(rest) == 0 or not np.any((free > 0) & (used < slots)):
                break
            r, sl, st, _ = _bfd_sorted(lengths[rest], row_len, slots, free, used)
            placed = r < num_rows  # in an existing row's gap, not a new row
            if not placed.any():
                break
            pieces.append((rest[placed], r[placed], sl[placed], st[placed]))
            np.subtract.at(free, r[placed], lengths[rest[placed]])
            np.add.at(used, r[placed], 1)
            rest = rest[~placed]
        item, row, slot, start = (np.concatenate(column) for column in zip(*pieces, strict=True))
        out.append((item, row, slot, start, num_rows))
        remaining = rest
    return out[::-1]


def pack_row_classes(
    lengths: np.ndarray, row_lengths: tuple[int, ...], slots_per_row: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]:
    """Pack items of `lengths` into rows of the lengths `row_lengths` (increasing), at most `slots_per_row`
    items per row (the `pack_buckets` layout).

    Each item lands in exactly one class. Returns per row length (items, row, slot, start, num_rows): int64
    arrays over that class's items (`items` index `lengths`), slots back to back from position 0 in each row.
    Depends only on the multiset of lengths (ties in input order), so row counts are the same every epoch.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if slots_per_row < 1:
        raise ValueError(f"data.slots_per_row must be >= 1, got {slots_per_row}")
    if list(row_lengths) != sorted(set(row_lengths)) or not row_lengths or row_lengths[0] < 1:
        raise ValueError(f"row lengths must be positive and increasing, got {row_lengths}")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > row_lengths[-1]):
        raise ValueError(
            f"data.row_len ({row_lengths[-1]}) must hold every item; lengths span {lengths.min()}..{lengths.max()}"
        )
    order = np.argsort(-lengths, kind="stable")
    return [(order[i], row, slot, start, n) for i, row, slot, start, n in
            _pack_classes_sorted(lengths[order], tuple(row_lengths), slots_per_row)]  # fmt: skip


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceCorpus:
    """The tokenised corpus on the device. codes, ages, visits: int32[T]; offsets: int32[n + 1]; lengths:
    int32[n]; labels: optional per-patient task labels [n, ...] gathered into batches by patient index."""

    codes: jax.Array
    ages: jax.Array
    visits: jax.Array
    offsets: jax.Array
    lengths: jax.Array
    labels: jax.Array | None = None


def _replicated(mesh: Mesh | None) -> Any:
    return NamedSharding(mesh, P()) if mesh is not None else None


def to_device(corpus: TokenizedCorpus, labels: np.ndarray | None = None, mesh: Mesh | None = None) -> DeviceCorpus:
    """Put `corpus` (and optional labels [n, ...]) on the device once; replicated over `mesh` if given."""
    if corpus.num_tokens >= 2**31:
        raise ValueError(f"corpus has {corpus.num_tokens} tokens; device offsets are int32 (at most 2**31 - 1)")
    if labels is not None and len(labels) != len(corpus):
        raise ValueError(f"labels has {len(labels)} rows, expected one per corpus patient ({len(corpus)})")
    host = DeviceCorpus(
        codes=np.asarray(corpus.codes, dtype=np.int32),
        ages=np.asarray(corpus.ages, dtype=np.int32),
        visits=np.asarray(corpus.visits, dtype=np.int32),
        offsets=np.asarray(corpus.offsets, dtype=np.int32),
        lengths=corpus.lengths,
        labels=None if labels is None else np.asarray(labels),
    )
    return put_global(host, _replicated(mesh))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BatchGroup:
    """Batches sharing one shape. patient_index, cls_index: int32[num_batches, rows, slots]."""

    corpus: DeviceCorpus
    patient_index: jax.Array
    cls_index: jax.Array
    row_len: int = dataclasses.field(metadata=dict(static=True))
    mesh: Mesh | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def num_batches(self) -> int:
        return self.patient_index.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, row_len) of every batch of the group."""
        return self.patient_index.shape[1], self.row_len


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """One epoch: its batch groups (one per shape) and `order` int32[num_batches, 2] = (group, batch in
    group), the sequence of batches to run."""

    groups: tuple[BatchGroup, ...]
    order: np.ndarray
    epoch: int

    @property
    def num_batches(self) -> int:
        return len(self.order)


def _gather_rows(corpus: DeviceCorpus, patient: jax.Array, cls: jax.Array, row_len: int) -> Batch:
    """The rows of one batch from its slots (patient, cls: int32[rows, slots]); runs per device on a mesh."""
    valid = patient >= 0
    safe = jnp.where(valid, patient, 0)
    length = jnp.where(valid, corpus.lengths[safe], 0)
    first = corpus.offsets[safe]
    pos = jnp.arange(row_len, dtype=jnp.int32)
    # Slots are back to back from position 0: a position's segment is the number of slots started at or before it.
    segment = jnp.sum(valid[:, None, :] & (cls[:, None, :] <= pos[None, :, None]), axis=-1, dtype=jnp.int32)
    slot = jnp.maximum(segment - 1, 0)
    within = pos[None, :] - jnp.take_along_axis(cls, slot, axis=1)
    real = (segment > 0) & (within < jnp.take_along_axis(length, slot, axis=1))
    token = jnp.where(real, jnp.take_along_axis(first, slot, axis=1) + within, 0)

    def take(values: jax.Array, fill: int) -> jax.Array:
        return jnp.where(real, jnp.take(values, token, mode="clip"), fill)

    batch = {
        "codes": take(corpus.codes, PAD),
        "ages": take(corpus.ages, 0),
        "visits": take(corpus.visits, 0),
        "segment_ids": jnp.where(real, segment, 0),
        "cls_index": jnp.where(valid, cls, 0),
        "patient_index": jnp.where(valid, patient, -1),
        "slot_mask": valid,
        "num_real_tokens": jnp.sum(length, dtype=jnp.int32),
    }
    if corpus.labels is not None:
        labels = corpus.labels[safe].astype(jnp.float32)
        batch["labels"] = jnp.where(valid.reshape(valid.shape + (1,) * (labels.ndim - 2)), labels, 0.0)
    return batch


def gather_batch(
    corpus: DeviceCorpus, patient: jax.Array, cls: jax.Array, row_len: int, mesh: Mesh | None = None
) -> Batch:
    """One batch from its slots (patient, cls: int32[rows, slots]): a pure gather from the device corpus.

    On a mesh each device gathers its own rows from its replica of the corpus: no communication but the sum
    of real tokens.
    """
    if mesh is None:
        return _gather_rows(corpus, patient, cls, row_len)

    def local(corpus: DeviceCorpus, patient: jax.Array, cls: jax.Array) -> Batch:
        batch = _gather_rows(corpus, patient, cls, row_len)
        batch["num_real_tokens"] = jax.lax.psum(batch["num_real_tokens"], DATA_AXIS)
        return batch

    keys = ["codes", "ages", "visits", "segment_ids", "cls_index", "patient_index", "slot_mask"]
    keys += ["labels"] if corpus.labels is not None else []
    out_specs = {k: P(DATA_AXIS) for k in keys} | {"num_real_tokens": P()}
    rows = P(DATA_AXIS)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), rows, rows), out_specs=out_specs)(corpus, patient, cls)


def _gather(group: BatchGroup, i: jax.Array | int) -> Batch:
    return gather_batch(group.corpus, group.patient_index[i], group.cls_index[i], group.row_len, group.mesh)


def batch_at(plan: EpochPlan | BatchGroup, i: jax.Array | int) -> Batch:
    """Batch `i` of an epoch plan (its `order[i]`), or of one batch group: a pure, jit-able gather from the
    device corpus.

    Returns codes, ages, visits, segment_ids: int32[rows, row_len]; cls_index, patient_index: int32[rows,
    slots]; slot_mask: bool[rows, slots]; num_real_tokens: int32[]; labels: float32[rows, slots, ...] when the
    corpus has labels. `i` may be traced for single-shape plans (`pack`, `pad_max`) or a `BatchGroup`; a
    `bucket` plan has one group per shape and needs a concrete `i` (or loop over `plan.groups`).
    """
    if isinstance(plan, BatchGroup):
        return _gather(plan, i)
    if len(plan.groups) == 1:
        return _gather(plan.groups[0], jnp.asarray(plan.order)[i, 1])
    try:
        g, j = (int(x) for x in np.asarray(plan.order[i]))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as err:
        raise ValueError(
            "batch_at: a plan with several shapes (bucket mode) needs a concrete batch index; "
            "loop over plan.groups for a traced one"
        ) from err
    return _gather(plan.groups[g], j)


def _bucket_batches(counts: np.ndarray, rows: list[int]) -> list[int]:
    """Batches per bucket when each bucket's remainder (less than a batch) moves up to the next bucket: only
    the last bucket has a partial batch, instead of one per bucket."""
    out, carried = [], 0
    for b, r in enumerate(rows):
        total = int(counts[b]) + carried
        out.append(-(-total // r) if b == len(rows) - 1 else total // r)
        carried = total - out[-1] * r if b < len(rows) - 1 else 0
    return out


def _check_pack_rows(row_len: int, max_len: int, slots_per_row: int) -> None:
    """Packed rows must hold the longest (truncated) patient and at least one patient slot."""
    if row_len < max_len:
        raise ValueError(f"data.row_len ({row_len}) must be >= data.max_len ({max_len}): a truncated patient must fit")
    if slots_per_row < 1:
        raise ValueError(f"data.slots_per_row must be >= 1, got {slots_per_row}")


class DeviceBatcher:
    """Plans epochs over a subset of a tokenised corpus and gathers their batches on the device.

    corpus: the host `TokenizedCorpus` (planning needs its lengths); device_corpus: the same corpus already
    on the device (`to_device`), to share one copy between batchers (train/val/test); otherwise it is put
    there with `labels`. patients: corpus indices to batch (default all). mesh: shard batch rows over its
    `data` axis.
    """

    def __init__(
        self,
        corpus: TokenizedCorpus,
        *,
        mode: str = "pack",
        row_len: int = 256,
        rows_per_batch: int = 32,
        slots_per_row: int = 16,
        tokens_per_batch: int = 8192,
        batch_size: int = 32,
        bucket_min_len: int = 8,
        pack_min_len: int = 32,
        seed: int = 0,
        patients: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        mesh: Mesh | None = None,
        device_corpus: DeviceCorpus | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"data.batching must be one of {MODES}, got {mode!r}")
        max_len = corpus.max_len
        self.mode = mode
        self.seed = int(seed)
        self.mesh = mesh
        if patients is None:
            patients = np.arange(len(corpus))
        patients = np.asarray(patients, dtype=np.int64)
        if len(patients) == 0:
            raise ValueError("patients: nothing to batch (empty cohort or split)")
        if patients.min() < 0 or patients.max() >= len(corpus):
            raise ValueError(f"patients: indices must lie in [0, {len(corpus)})")
        if len(np.unique(patients)) != len(patients):
            raise ValueError("patients: indices must be unique")
        self.patients = patients
        self.lengths = corpus.lengths[patients]
        self.num_real_tokens = int(self.lengths.sum())

        if mode == "pack":
            _check_pack_rows(row_len, max_len, slots_per_row)
            if rows_per_batch < 1:
                raise ValueError(f"data.rows_per_batch must be >= 1, got {rows_per_batch}")
            sorted_lengths = np.sort(self.lengths, kind="stable")[::-1]
            self._layout = _pack_sorted(sorted_lengths, row_len, slots_per_row)
            self.shapes = [(rows_per_batch, row_len)]
            self.group_batches = [-(-self._layout[3] // rows_per_batch)]
            self.slots = slots_per_row
        elif mode == "bucket":
            self.buckets = bucket_lengths(max_len, bucket_min_len)
            if tokens_per_batch < 1 or tokens_per_batch % self.buckets[-1]:
                raise ValueError(
                    f"data.tokens_per_batch ({tokens_per_batch}) must be a positive multiple of every bucket length "
                    f"{self.buckets}, i.e. of {self.buckets[-1]}"
                )
            self._bucket_of = np.searchsorted(np.asarray(self.buckets), self.lengths, side="left")
            self._bucket_rows = [tokens_per_batch // b for b in self.buckets]
            self._bucket_batches = _bucket_batches(
                np.bincount(self._bucket_of, minlength=len(self.buckets)), self._bucket_rows
            )
            self._bucket_ids = [b for b, count in enumerate(self._bucket_batches) if count]
            self.shapes = [(self._bucket_rows[b], self.buckets[b]) for b in self._bucket_ids]
            self.group_batches = [self._bucket_batches[b] for b in self._bucket_ids]
            self.slots = 1
        elif mode == "pack_buckets":
            _check_pack_rows(row_len, max_len, slots_per_row)
            self.row_lengths = pack_row_lengths(row_len, pack_min_len)
            multiple = math.lcm(*self.row_lengths)
            if tokens_per_batch < 1 or tokens_per_batch % multiple:
                raise ValueError(
                    f"data.tokens_per_batch ({tokens_per_batch}) must be a positive multiple of every pack row "
                    f"length {self.row_lengths}, i.e. of {multiple}"
                )
            sorted_lengths = np.sort(self.lengths, kind="stable")[::-1]
            classes = _pack_classes_sorted(sorted_lengths, self.row_lengths, slots_per_row)
            self._class_ids = [k for k, layout in enumerate(classes) if layout[4]]
            self._class_layouts = [classes[k] for k in self._class_ids]
            self.shapes = [(tokens_per_batch // self.row_lengths[k], self.row_lengths[k]) for k in self._class_ids]
            self.group_batches = [
                -(-layout[4] // rows) for layout, (rows, _) in zip(self._class_layouts, self.shapes, strict=True)
            ]
            self.slots = slots_per_row
        else:
            if batch_size < 1:
                raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
            self.shapes = [(batch_size, max_len)]
            self.group_batches = [-(-len(patients) // batch_size)]
            self.slots = 1
        self.num_batches = sum(self.group_batches)

        if mesh is not None:
            if DATA_AXIS not in mesh.axis_names:
                raise ValueError(f"mesh: expected a {DATA_AXIS!r} axis, got axes {mesh.axis_names}")
            devices = mesh.shape[DATA_AXIS]
            key = {"pack": "rows_per_batch", "bucket": "tokens_per_batch", "pad_max": "batch_size",
                   "pack_buckets": "tokens_per_batch"}[mode]  # fmt: skip
            for rows, length in self.shapes:
                if rows % devices:
                    raise ValueError(
                        f"data.{key}: batches of {rows} rows x {length} tokens cannot be split over the "
                        f"{devices} devices of the mesh's {DATA_AXIS!r} axis"
                    )
        if device_corpus is None:
            device_corpus = to_device(corpus, labels, mesh)
        elif labels is not None:
            raise ValueError("labels: pass them to to_device() when sharing a device_corpus")
        self.corpus = device_corpus

    @classmethod
    def from_config(
        cls,
        data: Any,
        corpus: TokenizedCorpus,
        *,
        seed: int,
        mode: str | None = None,
        patients: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        mesh: Mesh | None = None,
        device_corpus: DeviceCorpus | None = None,
    ) -> DeviceBatcher:
        """A batcher from the `c.data` config section (`mode` overrides `data.batching`)."""
        if corpus.max_len != data.max_len:
            raise ValueError(f"data.max_len ({data.max_len}) differs from the corpus's ({corpus.max_len}); re-tokenise")
        return cls(
            corpus,
            mode=mode or data.batching,
            row_len=data.row_len,
            rows_per_batch=data.rows_per_batch,
            slots_per_row=data.slots_per_row,
            tokens_per_batch=data.tokens_per_batch,
            batch_size=data.batch_size,
            bucket_min_len=data.bucket_min_len,
            pack_min_len=data.pack_min_len,
            seed=seed,
            patients=patients,
            labels=labels,
            mesh=mesh,
            device_corpus=device_corpus,
        )

    @property
    def computed_tokens(self) -> int:
        """Token slots computed per epoch (padding included)."""
        pairs = zip(self.group_batches, self.shapes, strict=True)
        return sum(count * rows * length for count, (rows, length) in pairs)

    @property
    def efficiency(self) -> float:
        """Real tokens / computed token slots."""
        return self.num_real_tokens / self.computed_tokens

    def _rows(
        self, rows: np.ndarray, patient: np.ndarray, slot: np.ndarray, start: np.ndarray, num_rows: int, batch_rows: int
    ) -> tuple[np.ndarray, np.ndarray]:
        num_batches = -(-num_rows // batch_rows)
        shape = (num_batches * batch_rows, self.slots)
        patient_index = np.full(shape, -1, dtype=np.int32)
        cls_index = np.zeros(shape, dtype=np.int32)
        patient_index[rows, slot] = patient
        cls_index[rows, slot] = start
        shape3 = (num_batches, batch_rows, self.slots)
        return patient_index.reshape(shape3), cls_index.reshape(shape3)

    def plan_epoch(self, epoch: int, shuffle: bool = True) -> EpochPlan:
        """Which patient goes where in epoch `epoch`: shuffled by (seed, epoch), or in a fixed order if not
        `shuffle` (evaluation). Vectorised numpy; the plan goes to the device (rows sharded on a mesh; each
        process of a multi-process job puts only its own devices' rows)."""
        parts, sequence = self.host_plan(epoch, shuffle)
        sharding = self.rows_sharding(3)
        groups = tuple(
            BatchGroup(
                corpus=self.corpus,
                patient_index=put_global(p, sharding),
                cls_index=put_global(c, sharding),
                row_len=length,
                mesh=self.mesh,
            )
            for (p, c), (_, length) in zip(parts, self.shapes, strict=True)
        )
        return EpochPlan(groups=groups, order=sequence, epoch=int(epoch))

    def rows_sharding(self, ndim: int) -> NamedSharding | None:
        """The sharding of an index array of `ndim` dimensions whose second-to-last axis is the batch rows."""
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, P(*([None] * (ndim - 2)), DATA_AXIS, None))

    def host_plan(self, epoch: int, shuffle: bool = True) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
        """`plan_epoch` on the host: per shape group (patient_index, cls_index) int32[num_batches, rows, slots],
        and the batch sequence int32[num_batches, 2] = (group, batch in group)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        order = rng.permutation(len(self.patients)) if shuffle else np.arange(len(self.patients))
        patients = self.patients[order]
        lengths = self.lengths[order]
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        if self.mode == "pack":
            row_s, slot_s, start_s, num_rows = self._layout
            by_length = patients[np.argsort(-lengths, kind="stable")]
            row_ids = rng.permutation(num_rows) if shuffle else np.arange(num_rows)
            parts.append(self._rows(row_ids[row_s], by_length, slot_s, start_s, num_rows, self.shapes[0][0]))
        elif self.mode == "bucket":
            bucket = self._bucket_of[order]
            carried = patients[:0]
            for b, rows in enumerate(self._bucket_rows):
                members = np.concatenate([carried, patients[bucket == b]])
                k = self._bucket_batches[b] * rows
                members, carried = members[:k], members[k:]
                if k:
                    zeros = np.zeros(len(members), dtype=np.int64)
                    parts.append(self._rows(np.arange(len(members)), members, zeros, zeros, k, rows))
        elif self.mode == "pack_buckets":
            by_length = patients[np.argsort(-lengths, kind="stable")]
            for (item, row, slot, start, num_rows), (rows, _) in zip(self._class_layouts, self.shapes, strict=True):
                row_ids = rng.permutation(num_rows) if shuffle else np.arange(num_rows)
                parts.append(self._rows(row_ids[row], by_length[item], slot, start, num_rows, rows))
        else:
            k = len(patients)
            zeros = np.zeros(k, dtype=np.int64)
            parts.append(self._rows(np.arange(k), patients, zeros, zeros, k, self.shapes[0][0]))

        sequence = np.concatenate(
            [np.stack([np.full(len(p), g), np.arange(len(p))], axis=1) for g, (p, _) in enumerate(parts)]
        ).astype(np.int32)
        if shuffle:
            sequence = sequence[rng.permutation(len(sequence))]
        return parts, sequence


def padding_report(
    corpus: TokenizedCorpus,
    data: Any,
    *,
    modes: tuple[str, ...] = MODES,
    patients: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Per mode: real tokens, computed token slots, efficiency, distinct shapes, batches per epoch and the
    time to plan one epoch (seconds, device transfer of the plan included)."""
    device_corpus = to_device(corpus)
    out: dict[str, dict[str, float]] = {}
    for mode in modes:
        t0 = time.perf_counter()
        batcher = DeviceBatcher.from_config(
            data, corpus, seed=seed, mode=mode, patients=patients, device_corpus=device_corpus
        )
        t_init = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan = batcher.plan_epoch(1)
        jax.block_until_ready([(g.patient_index, g.cls_index) for g in plan.groups])
        t_plan = time.perf_counter() - t0
        out[mode] = {
            "real_tokens": batcher.num_real_tokens,
            "computed_tokens": batcher.computed_tokens,
            "efficiency": batcher.efficiency,
            "distinct_shapes": len(batcher.shapes),
            "num_batches": batcher.num_batches,
            "init_seconds": t_init,
            "plan_seconds": t_plan,
        }
    return out


def format_padding_report(report: dict[str, dict[str, float]]) -> str:
    """The padding report as an aligned text table (`init s`: building the batcher, the packing layout
    included; `plan s`: planning one epoch)."""
    lines = [
        f"{'mode':<12} {'efficiency':>10} {'shapes':>6} {'batches':>8} {'real tokens':>12} "
        f"{'computed':>12} {'init s':>7} {'plan s':>7}"
    ]
    for mode, r in report.items():
        lines.append(
            f"{mode:<12} {r['efficiency']:>10.3f} {r['distinct_shapes']:>6d} {r['num_batches']:>8d} "
            f"{r['real_tokens']:>12,d} {r['computed_tokens']:>12,d} {r['init_seconds']:>7.3f} {r['plan_seconds']:>7.3f}"
        )
    return "\n".join(lines)
