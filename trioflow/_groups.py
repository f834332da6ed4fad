"""Consumer groups: a consumer's log divided into partitions by event key.

A consumer declared with ``partitions=N`` is a *group*: each event belongs to
one partition (`partition_of`), each partition has its own cursor and its own
lease, and the flows running the consumer (its *members*) share the
partitions among them. Every member computes the same target assignment
(`assign`) from the same view of the store's leases, keeps what it may keep,
lets go of what it must, and claims only partitions nobody holds: the
assignment converges without a coordinator, and a partition never has two
owners (the leases and their fencing see to that).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence


def partition_key(name: str, partition: int) -> str:
    """The cursor and lease key of one partition of group ``name``.

    Consumer names cannot hold ``/``, so no consumer's key looks like it.
    """
    return f"{name}/{partition}"


def partition_of(key: str | None, seq: int, partitions: int) -> int:
    """The partition of an event: by a stable hash of its key, else by its seq.

    The hash is CRC-32 of the key's UTF-8 bytes: the same in every process,
    host and Python version. Events without a key are spread by sequence
    number: they have no order among themselves in a group.
    """
    if key is None:
        return seq % partitions
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % partitions


def assign(
    partitions: int, members: Sequence[str], owners: Mapping[int, str]
) -> dict[str, frozenset[int]]:
    """The balanced, sticky assignment of ``partitions`` to ``members``.

    Args:
        partitions: How many partitions the group has (numbered from 0).
        members: The members' holder ids (any order; duplicates ignored).
        owners: The current owner of each partition that has one.

    Returns:
        Each member's partitions: every partition goes to exactly one member,
        the counts differ by at most one, and a member keeps as many of the
        partitions it owns as the balance allows (the lowest-numbered ones):
        only the excess moves. The same inputs give the same result in every
        member.
    """
    ordered = sorted(set(members))
    if not ordered:
        return {}
    owned: dict[str, list[int]] = {member: [] for member in ordered}
    for partition in range(partitions):
        owner = owners.get(partition)
        if owner in owned:
            owned[owner].append(partition)
    base, extra = divmod(partitions, len(ordered))
    # The members that own the most keep the larger share: fewer moves.
    by_holding = sorted(ordered, key=lambda member: (-len(owned[member]), member))
    quota = {member: base + (index < extra) for index, member in enumerate(by_holding)}
    target = {member: owned[member][: quota[member]] for member in ordered}
    kept = {partition for held in target.values() for partition in held}
    free = iter(partition for partition in range(partitions) if partition not in kept)
    for member in ordered:
        while len(target[member]) < quota[member]:
            target[member].append(next(free))
    return {member: frozenset(held) for member, held in target.items()}
