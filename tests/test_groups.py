"""Consumer groups: partitions of events, and the assignment of partitions to members."""

from __future__ import annotations

import random

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from trioflow._groups import assign, partition_of


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
