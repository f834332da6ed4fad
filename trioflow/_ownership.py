"""Which consumers this flow owns: its lease keeper.

Every flow that runs a consumer name competes for that consumer's lease in
the store; the one holding it handles events, the others stand by. The
`LeaseKeeper` owns this flow's view of every lease (`Ownership`): it claims
all of them in one store call every ``ttl / 3`` seconds (renewing the ones
it holds, trying to take the others), and hands each one's fencing token to
the writes made while it owns the consumer.

An owner stops handling a consumer as soon as it learns it lost the lease:
when a claim says another flow holds it, when a fenced write is refused, or
when ``0.9 * ttl`` seconds have passed since it sent its last successful
renewal without a new one (measured on this host's monotonic clock from
*before* the renewal was sent, so it gives up before the store's clock lets
another flow take over). A consumer's cancel scope is cancelled then; it stands by and,
once this flow owns it again, restarts from its durable cursor by the usual
start-up path.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterator, Sequence

import attrs
import trio

from ._errors import ConfigurationError, StoreError
from ._groups import assign, partition_key
from ._leases import Lease
from .stores._base import Store

logger = logging.getLogger("trioflow")

#: An owner acts on a lease for this share of its time after it sent the
#: claim that renewed it: a margin for clocks that run at slightly different
#: rates, and for the scheduling of the cancellation.
SAFETY = 0.9


#: Seconds a group's partition count holds: for good.
FOREVER = 100 * 365 * 24 * 3600.0

#: Seconds between two looks for the memberships of flows gone from a group.
FORGET_EVERY = 60.0


def count_key(name: str) -> str:
    """The lease key that records group ``name``'s partition count."""
    return f"{name}#partitions"


def member_key(name: str, holder: str) -> str:
    """The lease key by which flow ``holder`` is a member of group ``name``."""
    return f"{name}#member:{holder}"


@attrs.define(eq=False)
class Ownership:
    """Whether this flow owns one consumer, as its `LeaseKeeper` knows; others only read it."""

    key: str
    #: The consumer group it is a partition of, if any: the keeper claims it
    #: only while the group's assignment gives it to this flow.
    group: str | None = None
    #: The fencing token while this flow owns it, else None.
    _token: int | None = None
    #: The holder the store last named (this flow's id when it owns it).
    _owner: str | None = None
    #: Whether a claim has answered for it at least once.
    _known: bool = False
    #: Handing it over (a group's partition moving): no longer handled here,
    #: its token still good for the final cursor flush until released.
    _leaving: bool = False
    #: trio time until which this flow may act as its owner without a renewal.
    _valid_until: float = -math.inf
    #: Cancelled when it is lost: the scopes of the work done as its owner.
    _scopes: set[trio.CancelScope] = attrs.Factory(set)
    _changed: trio.Event = attrs.Factory(trio.Event)

    @property
    def token(self) -> int | None:
        """The fencing token while this flow holds its lease (also while it hands
        it over, for the final cursor flush), else None."""
        return self._token

    @property
    def owned(self) -> bool:
        """Whether this flow owns it now and handles it.

        Not once the time its last renewal gave it has run out, even before
        the keeper has noticed: a process that was stopped (SIGSTOP, a long
        pause) wakes up with that time long gone, and its consumers must not
        start another call in the moment before the keeper runs.
        """
        return self.owned_at(trio.current_time())

    def owned_at(self, now: float) -> bool:
        """`owned`, with ``now`` the trio time the caller has just read (a hot loop's)."""
        return self._held and now < self._valid_until

    @property
    def _held(self) -> bool:
        """Whether this flow holds it as its owner, as the keeper last knew (maybe lapsed)."""
        return self._token is not None and not self._leaving

    @property
    def owner(self) -> str | None:
        """The holder id of its owner as last seen (this flow's own when it owns it)."""
        return self._owner

    @property
    def known(self) -> bool:
        """Whether the store has answered for it: this flow owns it or stands by."""
        return self._known

    async def wait_changed(self) -> None:
        """Wait until it is gained, lost, or another owner is seen."""
        await self._changed.wait()

    @contextlib.contextmanager
    def cancelling(self, scope: trio.CancelScope) -> Iterator[None]:
        """Cancel ``scope`` when this flow loses it (at once if it does not own it now)."""
        if not self.owned:
            scope.cancel()
        self._scopes.add(scope)
        try:
            yield
        finally:
            self._scopes.discard(scope)

    def _leave(self) -> None:
        """Stop handling it here, keeping the token for the final flush."""
        if self._held:
            self._leaving = True
            for scope in self._scopes:
                scope.cancel()
            self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _gain(self, token: int, valid_until: float, holder: str) -> None:
        # Renewed after its time ran out: consumers that saw it lapse look again.
        lapsed = self._valid_until <= trio.current_time()
        changed = self._token != token or not self._known or self._leaving or lapsed
        self._leaving = False
        self._token = token
        self._owner = holder
        self._valid_until = valid_until
        self._known = True
        if changed:
            self._signal()

    def _lose(self, owner: str | None) -> bool:
        """Stand by; return whether it was owned until now."""
        was_owned = self._token is not None
        changed = was_owned or self._owner != owner or not self._known
        self._leaving = False
        self._token = None
        self._valid_until = -math.inf
        self._owner = owner
        self._known = True
        for scope in self._scopes:
            scope.cancel()
        if changed:
            self._signal()
        return was_owned


async def _nothing_to_hand_over(keys: Sequence[str]) -> None:
    await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class _Group:
    name: str
    partitions: int
    ownerships: list[Ownership]


@attrs.define(eq=False)
class LeaseKeeper:
    """Claims and renews this flow's leases; the one owner of its `Ownership`s."""

    store: Store
    #: This flow's holder id (`trioflow._leases.new_holder_id`).
    holder: str
    #: Seconds a lease lasts without renewal.
    ttl: float
    #: Backoff between claims that fail, by attempt (capped at ``ttl / 3``).
    retry_delay: Callable[[int], float]
    #: Called whenever an ownership changes (the flow's idle waiters look again).
    on_change: Callable[[], None] = lambda: None
    #: Called with the keys of partitions this flow hands over, after their
    #: consumers were told to stop and before the leases are released: the
    #: flow commits their positions (still fenced by this flow's tokens).
    hand_over: Callable[[Sequence[str]], Awaitable[None]] = _nothing_to_hand_over
    _ownerships: dict[str, Ownership] = attrs.Factory(dict)
    _groups: dict[str, _Group] = attrs.Factory(dict)
    _wakeup: trio.Event = attrs.Factory(trio.Event)
    _failures: int = 0
    #: Held by a claim and by a release: a claim under way when leases are
    #: released cannot land after the release and take them again.
    _calling: trio.Lock = attrs.Factory(trio.Lock)

    @property
    def renew_every(self) -> float:
        """Seconds between claims: a third of the lease's time."""
        return self.ttl / 3

    def ownership(self, key: str) -> Ownership:
        """The ownership of ``key``, claimed from now on (at once if the keeper runs)."""
        own = self._ownerships.get(key)
        if own is None:
            own = self._ownerships[key] = Ownership(key)
            self._wakeup.set()
        return own

    async def join(self, name: str, partitions: int) -> Sequence[Ownership]:
        """Make this flow a member of consumer group ``name``: the ownership of
        each of its partitions, claimed as the group's assignment says.

        The group's partition count is fixed in the store by its first member
        (a lease that never lapses, held by ``partitions=N``).

        Raises:
            ConfigurationError: The group exists with another partition count.
        """
        count = f"partitions={partitions}"
        async with self._calling:
            (lease,) = await self.store.claim_leases(count, [count_key(name)], FOREVER)
        if lease.holder != count:
            stored = lease.holder.removeprefix("partitions=")
            raise ConfigurationError(
                f"consumer group {name!r} has {stored} partitions in the store, not "
                f"{partitions}: a group's partition count is fixed when it first runs. "
                f"Keep {stored}, or move to a new consumer name (docs/deploying.md)"
            )
        group = _Group(
            name,
            partitions,
            [Ownership(partition_key(name, p), group=name) for p in range(partitions)],
        )
        self._groups[name] = group
        for own in group.ownerships:
            self._ownerships[own.key] = own
        self._wakeup.set()
        return group.ownerships

    async def leave(self, name: str, *, forget: bool = False) -> None:
        """Leave consumer group ``name``: release its partitions and membership at once.

        With ``forget`` the partition count is released too: the group may be
        created again with another count.
        """
        group = self._groups.pop(name, None)
        if group is None:
            await trio.lowlevel.checkpoint()
            return
        await self.release(
            [own.key for own in group.ownerships], also=[member_key(name, self.holder)]
        )
        if forget:
            with contextlib.suppress(StoreError):
                async with self._calling:
                    await self.store.release_leases(
                        f"partitions={group.partitions}", [count_key(name)]
                    )

    def token(self, key: str) -> int | None:
        """The fencing token of ``key`` while this flow owns it, else None."""
        own = self._ownerships.get(key)
        return None if own is None else own.token

    def lost(self, key: str, token: int) -> None:
        """A write fenced with ``token`` was refused: another flow holds ``key`` now."""
        own = self._ownerships.get(key)
        if own is not None and own.token == token:
            logger.warning(
                "consumer %r: the store refused a write of this flow (%s): another flow took "
                "its lease over; this flow stops handling it and stands by",
                key,
                self.holder,
            )
            own._lose(None)
            self._notify()
            self._wakeup.set()

    async def release(self, keys: Sequence[str], *, also: Sequence[str] = ()) -> None:
        """Stop claiming ``keys`` and let another flow take them at once (a graceful stop).

        ``also``: other leases of this flow to release (a group membership).
        Failures are logged, not raised: a lease not released lapses after ``ttl``.
        """
        owned = list(also)
        for key in keys:
            own = self._ownerships.pop(key, None)
            if own is not None and own._lose(self.holder):
                owned.append(key)
        if not owned:
            await trio.lowlevel.checkpoint()
            return
        try:
            async with self._calling:
                await self.store.release_leases(self.holder, owned)
        except StoreError as exc:
            logger.warning(
                "could not release the leases of %s (%s); other flows take them over once "
                "they lapse, within %.1fs",
                ", ".join(map(repr, owned)),
                exc,
                self.ttl,
            )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Claim every lease every `renew_every` seconds, until cancelled.

        Reports itself started once the store has answered for every lease
        (a store failure before that is retried, and waited for cancellably).
        """
        started = False
        while True:
            self._wakeup = trio.Event()
            await self._claim()
            self._expire_overdue()
            if not started and all(own.known for own in self._ownerships.values()):
                started = True
                task_status.started()
            if self._failures:
                delay = min(self.retry_delay(self._failures), self.renew_every)
            else:
                delay = self.renew_every
            with trio.move_on_at(min(trio.current_time() + delay, self._deadline())):
                await self._wakeup.wait()

    async def forget_departed(self) -> None:
        """Delete the membership leases of flows gone from this flow's groups, until cancelled.

        Every flow that joins a group claims a membership lease of its own (its
        holder id is new each time), and leaves it lapsed in the store when it
        stops or dies. Those lapsed for a lease's time are forgotten now and
        every `FORGET_EVERY` seconds, so that they do not pile up over years of
        restarts. Failures are logged and tried again the next time.
        """
        while True:
            for name in list(self._groups):
                try:
                    forgotten = await self.store.forget_lapsed_leases(
                        member_key(name, ""), lapsed_for=self.ttl
                    )
                except StoreError as exc:
                    logger.info(
                        "consumer group %r: could not forget the memberships of flows gone "
                        "from it (%s); trying again in %.0fs",
                        name,
                        exc,
                        FORGET_EVERY,
                    )
                else:
                    if forgotten:
                        logger.debug(
                            "consumer group %r: forgot the memberships of %d flow(s) gone from it",
                            name,
                            forgotten,
                        )
            await trio.sleep(FORGET_EVERY)

    def _deadline(self) -> float:
        """When the first lease this flow owns must be given up without a renewal."""
        return min(
            (own._valid_until for own in self._ownerships.values() if own._held),
            default=math.inf,
        )

    async def _claim(self) -> None:
        if not self._ownerships:
            await trio.lowlevel.checkpoint()
            return
        sent = trio.current_time()
        # A claim that hangs must not keep this flow acting as an owner past
        # its leases' time: give up waiting for it then.
        leases: Sequence[Lease] | None = None
        others: dict[str, str] = {}
        with trio.move_on_at(self._deadline()):
            try:
                async with self._calling:
                    keys = [k for k, own in self._ownerships.items() if own.group is None]
                    if self._groups:
                        wanted, others = await self._rebalance()
                        keys += wanted
                    leases = await self.store.claim_leases(self.holder, sorted(keys), self.ttl)
            except StoreError as exc:
                self._failures += 1
                if self._failures == 1 or self._failures % 10 == 0:
                    logger.warning(
                        "claiming the leases of this flow's consumers failed (%s), %d time(s) "
                        "in a row; consumers it owns stop %.1fs after its last renewal "
                        "unless one succeeds",
                        exc,
                        self._failures,
                        self.ttl * SAFETY,
                    )
                return
        if leases is None:
            # Hung past the deadline: `_expire_overdue` gives the leases up.
            self._failures += 1
            return
        if self._failures and not self._deadline() < trio.current_time():
            logger.info("claiming leases works again")
        self._failures = 0
        self._apply(leases, sent + self.ttl * SAFETY)
        # Partitions the assignment gives to others: this flow stands by.
        claimed = {lease.key for lease in leases}
        for group in self._groups.values():
            for own in group.ownerships:
                if own.key not in claimed and (not own.known or own.owner != others.get(own.key)):
                    own._lose(others.get(own.key))
                    self._notify()

    async def _rebalance(self) -> tuple[list[str], dict[str, str]]:
        """Look at the groups' leases; let go of the partitions the assignment
        moves elsewhere; return the keys to claim (memberships and partitions
        assigned here) and the other members' partitions, by key."""
        live = await self.store.leases()
        wanted: list[str] = []
        others: dict[str, str] = {}
        moving: list[Ownership] = []
        for group in self._groups.values():
            prefix = member_key(group.name, "")
            members = {lease.holder for lease in live if lease.key.startswith(prefix)}
            members.add(self.holder)
            keys = {own.key: p for p, own in enumerate(group.ownerships)}
            owners = {keys[lease.key]: lease.holder for lease in live if lease.key in keys}
            mine = assign(group.partitions, sorted(members), owners)[self.holder]
            wanted.append(member_key(group.name, self.holder))
            for partition, own in enumerate(group.ownerships):
                if partition in mine:
                    wanted.append(own.key)
                    continue
                if partition in owners and owners[partition] != self.holder:
                    others[own.key] = owners[partition]
                if own._held:
                    logger.info(
                        "consumer %r: this flow (%s) hands it over: the group's partitions are "
                        "shared anew",
                        own.key,
                        self.holder,
                    )
                    own._leave()
                    moving.append(own)
        if moving:
            self._notify()
            await self.hand_over([own.key for own in moving])
            for own in moving:
                own._lose(None)
            await self.store.release_leases(self.holder, [own.key for own in moving])
        return wanted, others

    def _apply(self, leases: Sequence[Lease], valid_until: float) -> None:
        changed = False
        for lease in leases:
            own = self._ownerships.get(lease.key)
            if own is None:
                # Released while the claim was under way.
                continue
            if lease.holder == self.holder:
                if own.token is not None and own.token != lease.token:
                    # It lapsed and this flow took it again: the work done
                    # under the old token starts over.
                    own._lose(self.holder)
                if not own.owned:
                    # Quietly at start-up; loudly when it takes over.
                    logger.log(
                        logging.INFO if own.known else logging.DEBUG,
                        "consumer %r: this flow (%s) owns it now (lease token %d)",
                        own.key,
                        self.holder,
                        lease.token,
                    )
                    changed = True
                own._gain(lease.token, valid_until, self.holder)
            elif own._held:
                logger.warning(
                    "consumer %r: flow %s took its lease over; this flow (%s) stops handling "
                    "it and stands by",
                    own.key,
                    lease.holder,
                    self.holder,
                )
                own._lose(lease.holder)
                changed = True
            elif own.owner != lease.holder:
                logger.info(
                    "consumer %r: flow %s owns it; this flow (%s) stands by",
                    own.key,
                    lease.holder,
                    self.holder,
                )
                own._lose(lease.holder)
                changed = True
        if changed:
            self._notify()

    def _expire_overdue(self) -> None:
        now = trio.current_time()
        for own in self._ownerships.values():
            if own._held and own._valid_until <= now:
                logger.warning(
                    "consumer %r: this flow (%s) could not renew its lease within %.1fs; it "
                    "stops handling it and stands by until it owns it again",
                    own.key,
                    self.holder,
                    self.ttl * SAFETY,
                )
                own._lose(None)
                self._notify()

    def _notify(self) -> None:
        self.on_change()
