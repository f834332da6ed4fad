"""Consumer groups: partitions of events, and the assignment of partitions to members."""

from __future__ import annotations

import random

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import trioflow
from trioflow._groups import assign, partition_of
from trioflow._ownership import FORGET_EVERY
from trioflow.stores import Store
from trioflow.stores.memory import MemoryStore
from trioflow.testing import FaultyStore


def test_a_key_has_the_same_partition_everywhere() -> None:
    # CRC-32 of the UTF-8 bytes: fixed values, whatever the process or host.
    assert [partition_of(k, 0, 16) for k in ("a", "order-7", "ü 🎉", "")] == [3, 10, 9, 0]
    assert partition_of("a", 1, 16) == partition_of("a", 2, 16)


def test_events_without_a_key_are_spread_by_seq() -> None:
    assert [partition_of(None, seq, 4) for seq in range(1, 9)] == [1, 2, 3, 0, 1, 2, 3, 0]


@given(
    partitions=st.integers(1, 64),
    members=st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=10),
    owners=st.dictionaries(st.integers(0, 63), st.text(min_size=1, max_size=3)),
)
def test_every_partition_goes_to_one_member_and_the_spread_is_within_one(
    partitions: int, members: list[str], owners: dict[int, str]
) -> None:
    result = assign(partitions, members, owners)
    assert set(result) == set(members)
    held = [p for parts in result.values() for p in parts]
    assert sorted(held) == list(range(partitions))
    counts = [len(parts) for parts in result.values()]
    assert max(counts) - min(counts) <= 1
    # Sticky: a member keeps what it owns, up to its share.
    share = -(-partitions // len(set(members)))
    for member, parts in result.items():
        mine = [p for p in range(partitions) if owners.get(p) == member]
        assert len(set(mine) & parts) >= min(len(mine), share - 1)
    # Every member computes the same assignment, whatever order it sees.
    assert assign(partitions, list(reversed(members)), owners) == result


def test_a_new_member_takes_only_the_excess() -> None:
    before = assign(12, ["a", "b", "c"], {})
    owners = {p: m for m, parts in before.items() for p in parts}
    after = assign(12, ["a", "b", "c", "d"], owners)
    moved = [p for p in range(12) if owners[p] != next(m for m, ps in after.items() if p in ps)]
    assert len(moved) == 3
    assert all(p in after["d"] for p in moved)


# -- the assignment as members run it, through leases --------------------------

TTL = 3  # rounds a lease lasts without renewal


@attrs.frozen
class Join:
    pass


@attrs.frozen
class Leave:
    index: int


@attrs.frozen
class Die:
    index: int


@attrs.frozen
class Rounds:
    count: int


Step = Join | Leave | Die | Rounds
steps = st.lists(
    st.one_of(
        st.builds(Join),
        st.builds(Leave, st.integers(0, 20)),
        st.builds(Die, st.integers(0, 20)),
        st.builds(Rounds, st.integers(1, 2 * TTL)),
    ),
    max_size=30,
)


@attrs.define
class Group:
    """Leases by key, expiring at a round; members act once per round in random order."""

    partitions: int
    rng: random.Random
    now: int = 0
    #: key -> (holder, expires at round)
    leases: dict[object, tuple[str, int]] = attrs.Factory(dict)
    alive: list[str] = attrs.Factory(list)
    names: int = 0

    def live(self, key: object) -> str | None:
        lease = self.leases.get(key)
        return lease[0] if lease is not None and lease[1] > self.now else None

    def join(self) -> None:
        self.names += 1
        self.alive.append(f"m{self.names}")

    def leave(self, member: str) -> None:
        self.alive.remove(member)
        for key, (holder, _) in list(self.leases.items()):
            if holder == member:
                self.leases[key] = (holder, self.now)

    def die(self, member: str) -> None:
        self.alive.remove(member)

    def act(self, member: str) -> None:
        self.leases["member", member] = (member, self.now + TTL)
        members = [k[1] for k in self.leases if isinstance(k, tuple) and self.live(k)]
        owners = {p: h for p in range(self.partitions) if (h := self.live(p)) is not None}
        target = assign(self.partitions, members, owners)[member]
        for p in range(self.partitions):
            holder = self.live(p)
            if holder == member and p not in target:
                self.leases[p] = (member, self.now)  # released
            elif p in target and holder in (None, member):
                self.leases[p] = (member, self.now + TTL)

    def round(self) -> None:
        self.now += 1
        for member in self.rng.sample(self.alive, len(self.alive)):
            self.act(member)


@settings(max_examples=300, deadline=None)
@given(partitions=st.integers(1, 24), plan=steps, seed=st.integers(0, 2**16))
def test_members_joining_leaving_and_dying_settle_balanced_with_one_owner_each(
    partitions: int, plan: list[Step], seed: int
) -> None:
    group = Group(partitions, random.Random(seed))
    group.join()
    for step in plan:
        if isinstance(step, Join):
            group.join()
        elif isinstance(step, Rounds):
            for _ in range(step.count):
                group.round()
        elif len(group.alive) > 1:
            member = group.alive[step.index % len(group.alive)]
            (group.leave if isinstance(step, Leave) else group.die)(member)
    # Quiescence: no joins, leaves or deaths for a while.
    for _ in range(4 * TTL):
        group.round()
    owners = {p: group.live(p) for p in range(partitions)}
    assert all(owner in group.alive for owner in owners.values()), owners
    counts = [sum(1 for o in owners.values() if o == m) for m in group.alive]
    assert max(counts) - min(counts) <= 1, counts
    # Quiet: another round moves nothing.
    group.round()
    assert {p: group.live(p) for p in range(partitions)} == owners


# -- groups in running flows ----------------------------------------------------

LEASE = 6.0


def group_app(
    store: Store,
    log: list[tuple[str, int, str | None, int]],
    tag: int,
    *,
    partitions: int = 8,
    delay: float = 0.0,
    **options: object,
) -> trioflow.App:
    """An App with group "g", whose handler logs (what, seq, key, tag) per call."""
    app = trioflow.App(store, lease_ttl=LEASE)

    @app.consumer("g", partitions=partitions, **options)  # type: ignore[call-overload, untyped-decorator]
    async def handle(event: trioflow.Event) -> None:
        log.append(("start", event.seq, event.key, tag))
        try:
            await trio.sleep(delay)
        except trio.Cancelled:
            log.append(("cancel", event.seq, event.key, tag))
            raise
        log.append(("end", event.seq, event.key, tag))

    return app


def check_per_key_order(log: list[tuple[str, int, str | None, int]], head: int) -> None:
    """Every event handled; per key, first handled in seq order."""
    firsts: list[tuple[int, str | None]] = []
    seen: set[int] = set()
    for what, seq, key, _ in log:
        if what == "end" and seq not in seen:
            seen.add(seq)
            firsts.append((seq, key))
    assert seen == set(range(1, head + 1))
    last: dict[str, int] = {}
    for seq, key in firsts:
        if key is not None:
            assert seq > last.get(key, 0), f"key {key}: {seq} first handled after a later one"
            last[key] = seq


def owned_partitions(flow: trioflow.Flow) -> set[str]:
    return {name for name, stats in flow.statistics().consumers.items() if stats.owned}


async def test_one_flow_runs_a_groups_partitions_concurrently_in_key_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[tuple[str, int, str | None, int]] = []
    app = group_app(MemoryStore(), log, 0, partitions=4, delay=1.0)
    async with trioflow.open_flow(app) as flow:
        assert len(owned_partitions(flow)) == 4
        start = trio.current_time()
        await flow.publish_many([("x", i, f"k{i % 8}") for i in range(40)])
        await flow.wait_idle()
        elapsed = trio.current_time() - start
    check_per_key_order(log, 40)
    assert len([entry for entry in log if entry[0] == "end"]) == 40
    # Four partitions at once: far less than one second per event.
    assert elapsed < 20, elapsed


async def test_members_share_the_partitions_and_each_event_is_handled_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    log: list[tuple[str, int, str | None, int]] = []
    apps = [group_app(store, log, tag) for tag in range(3)]
    async with (
        trioflow.open_flow(apps[0]) as f0,
        trioflow.open_flow(apps[1]) as f1,
        trioflow.open_flow(apps[2]) as f2,
    ):
        await trio.sleep(3 * LEASE)
        counts = sorted(len(owned_partitions(f)) for f in (f0, f1, f2))
        assert counts == [2, 3, 3]
        owners = [owned_partitions(f) for f in (f0, f1, f2)]
        assert set().union(*owners) == {f"g/{p}" for p in range(8)}
        for i in range(60):
            await (f0, f1, f2)[i % 3].publish("x", i, key=f"k{i % 7}" if i % 5 else None)
        for flow in (f0, f1, f2):
            await flow.wait_idle()
    ends = [seq for what, seq, _, _ in log if what == "end"]
    assert sorted(ends) == list(range(1, 61))
    check_per_key_order(log, 60)


async def test_a_member_that_leaves_or_dies_hands_its_partitions_to_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    log: list[tuple[str, int, str | None, int]] = []
    faulty = FaultyStore(store)
    apps = [group_app(store, log, 0), group_app(faulty, log, 1), group_app(store, log, 2)]
    async with trioflow.open_flow(apps[0]) as f0, trioflow.open_flow(apps[2]) as f2:
        async with trioflow.open_flow(apps[1]) as f1:
            await trio.sleep(3 * LEASE)
            assert sorted(len(owned_partitions(f)) for f in (f0, f1, f2)) == [2, 3, 3]
            await f0.publish_many([("x", i, f"k{i}") for i in range(30)])
            # f1 is cut off from the store: its claims fail.
            faulty.fail_next("claim_leases", times=10**6)
            faulty.fail_next("leases", times=10**6)
            await trio.sleep(3 * LEASE)
            assert owned_partitions(f1) == set()
            assert sorted(len(owned_partitions(f)) for f in (f0, f2)) == [4, 4]
            faulty.fail_next("claim_leases", times=0)
        await f0.publish_many([("x", i, f"k{i}") for i in range(30, 60)])
        await f0.wait_idle()
        await f2.wait_idle()
        assert sorted(len(owned_partitions(f)) for f in (f0, f2)) == [4, 4]
    check_per_key_order(log, 60)


async def test_the_memberships_of_departed_flows_are_forgotten(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    log: list[tuple[str, int, str | None, int]] = []
    departed: list[tuple[str, str]] = []
    async with trioflow.open_flow(group_app(store, log, 0)):
        async with trioflow.open_flow(group_app(store, log, 1)):
            await trio.sleep(3 * LEASE)
            members = [(x.key, x.holder) for x in await store.leases() if "#member:" in x.key]
            assert len(members) == 2
        # The second flow stopped: its membership lapsed, and stays lapsed
        # until the first flow's next look (`FORGET_EVERY`).
        await trio.sleep(3 * LEASE)
        live = {x.key for x in await store.leases()}
        departed = [(key, holder) for key, holder in members if key not in live]
        assert len(departed) == 1
        await trio.sleep(FORGET_EVERY)
    # Forgotten: claimed again, the key starts over at token 1 (else 2).
    ((key, holder),) = departed
    (claimed,) = await store.claim_leases(holder, [key], LEASE)
    assert claimed.token == 1
    # The first flow stopped too, and was the last to look: its own is kept.
    (kept,) = [(k, h) for k, h in members if k != key]
    (again,) = await store.claim_leases(kept[1], [kept[0]], LEASE)
    assert again.token == 2


async def test_a_failing_forget_of_departed_memberships_delays_it_and_nothing_else(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    faulty = FaultyStore(store)
    log: list[tuple[str, int, str | None, int]] = []
    async with trioflow.open_flow(group_app(faulty, log, 0)) as flow:
        async with trioflow.open_flow(group_app(store, log, 1)):
            await trio.sleep(3 * LEASE)
            members = {x.key for x in await store.leases() if "#member:" in x.key}
        await trio.sleep(3 * LEASE)
        (departed,) = members - {x.key for x in await store.leases()}
        faulty.fail_next("forget_lapsed_leases", times=2)
        await trio.sleep(FORGET_EVERY)
        assert [method for method, _ in faulty.injected] == ["forget_lapsed_leases"]
        # The store failed the forget: the flow goes on handling events.
        await flow.publish_many([("x", i, f"k{i}") for i in range(20)])
        await flow.wait_idle()
        holder = departed.partition("#member:")[2]
        (kept,) = await store.claim_leases(holder, [departed], LEASE)
        assert kept.token == 2
        await store.release_leases(holder, [departed])
        await trio.sleep(2 * FORGET_EVERY)
    # Tried again once the store answers: forgotten.
    (claimed,) = await store.claim_leases(holder, [departed], LEASE)
    assert claimed.token == 1
    check_per_key_order(log, 20)


async def test_a_group_keeps_the_partition_count_it_started_with(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    log: list[tuple[str, int, str | None, int]] = []
    async with trioflow.open_flow(group_app(store, log, 0, partitions=8)):
        pass
    with pytest.raises(trioflow.ConfigurationError, match="has 8 partitions in the store, not 4"):
        async with trioflow.open_flow(group_app(store, log, 1, partitions=4)):
            pass
    # Removed with forget=True, it may start again with another count.
    app = group_app(store, log, 2, partitions=8)
    async with trioflow.open_flow(app) as flow:
        await flow.remove_consumer("g", forget=True)
        assert flow.statistics().consumers == {}
    async with trioflow.open_flow(group_app(store, log, 3, partitions=4)) as flow:
        assert len(owned_partitions(flow)) == 4


async def test_a_groups_dead_letters_are_listed_requeued_and_discarded_by_its_name(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    app = trioflow.App(store, lease_ttl=LEASE)
    fixed = False
    handled: list[int] = []

    @app.consumer("g", partitions=4, retry=trioflow.Retry(attempts=1), on_exhausted="dead-letter")
    async def handle(event: trioflow.Event) -> None:
        if event.data == "poison" and not fixed:
            raise RuntimeError("poison")
        handled.append(event.seq)

    async with trioflow.open_flow(app) as flow:
        seqs = await flow.publish_many([("x", "poison", f"k{i}") for i in range(4)])
        await flow.wait_idle()
        letters = await flow.dead_letters("g")
        assert sorted(letter.seq for letter in letters) == seqs
        assert {letter.consumer for letter in letters} <= {f"g/{p}" for p in range(4)}
        fixed = True
        await flow.requeue("g", seqs[:3])
        await flow.wait_idle()
        assert sorted(handled) == seqs[:3]
        await flow.discard("g", seqs[3:])
        assert await flow.dead_letters("g") == []
        with pytest.raises(trioflow.UnknownDeadLetterError):
            await flow.discard("g", seqs[:1])


def test_partitions_are_checked() -> None:
    app = trioflow.App("memory://")
    for bad in (0, -1, 1025, 2.0, "8", True):
        with pytest.raises(trioflow.ConfigurationError, match="partitions"):

            @app.consumer("g", partitions=bad)  # type: ignore[arg-type]
            async def handle(event: trioflow.Event) -> None: ...


async def test_a_group_replays_the_log_each_event_in_one_partition(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    async with trioflow.open_flow(trioflow.App(store)) as publisher:
        await publisher.publish_many([("x", i, f"k{i % 5}" if i % 3 else None) for i in range(50)])
    log: list[tuple[str, int, str | None, int]] = []
    async with trioflow.open_flow(group_app(store, log, 0, partitions=3)) as flow:
        await flow.wait_idle()
    assert sorted(seq for what, seq, _, _ in log if what == "end") == list(range(1, 51))
    check_per_key_order(log, 50)


async def test_a_member_joining_mid_stream_takes_partitions_without_redelivery(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    log: list[tuple[str, int, str | None, int]] = []
    first = group_app(store, log, 0, partitions=4, delay=0.5)
    second = group_app(store, log, 1, partitions=4, delay=0.5)
    async with trioflow.open_flow(first) as flow:
        await flow.publish_many([("x", i, f"k{i % 12}") for i in range(200)])
        await trio.sleep(5)
        async with trioflow.open_flow(second) as other:
            await flow.wait_idle()
            await other.wait_idle()
            assert sorted(len(owned_partitions(f)) for f in (flow, other)) == [2, 2]
    check_per_key_order(log, 200)
    ends = [seq for what, seq, _, _ in log if what == "end"]
    # Handed over with their positions committed: nothing handled twice
    # (a handler cancelled mid-call is handled once, by the next owner).
    assert sorted(ends) == list(range(1, 201))
    assert {tag for what, _, _, tag in log if what == "end"} == {0, 1}


async def test_a_partition_handed_over_is_never_handled_by_two_members_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    log: list[tuple[str, int, str | None, int]] = []
    keys = [next(f"k{i}" for i in range(100) if partition_of(f"k{i}", 0, 2) == p) for p in (0, 1)]
    first = group_app(store, log, 0, partitions=2, delay=10.0)
    second = group_app(store, log, 1, partitions=2, delay=10.0)
    async with trioflow.open_flow(first) as flow:
        await flow.publish_many([("x", None, key) for key in keys])
        await trio.sleep(1)
        async with trioflow.open_flow(second) as other:
            await flow.wait_idle()
            await other.wait_idle()
    for key in keys:
        calls = [(what, seq, tag) for what, seq, k, tag in log if k == key]
        running = None
        for what, seq, tag in calls:
            if what == "start":
                assert running is None, f"{key}: {tag} started {seq} while {running} ran"
                running = tag
            else:
                running = None
    check_per_key_order(log, 2)
