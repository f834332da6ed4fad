"""What a scenario of the ``scenarios`` workload is, how Hypothesis draws one, and its inputs.

A `Scenario` is a plain frozen value: its consumers (each a `ConsumerPlan`:
slowdown, failures, type filter, buffer bound, ``commit_every``, delivery
policy), how events are published (batch size, pause between batches), how
big they are, and how many. `generate` draws a list of them with Hypothesis
from an explicit seed, so that ``--seed S --scenarios M`` gives the same list
every time. `prepare` turns one into the exact inputs of a run (every event's
data and type, every handler's per-event sleep, the events whose first
handling raises, the poison events that raise on every attempt), drawn from
the scenario's salts: the same for every store and for the raw-channel
reference.

Hypothesis is imported where the scenarios are drawn, not at import time: it
comes with trioflow's test extras, and listing the workloads must not need it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import attrs

import trioflow
from trioflow._policies import ON_EXHAUSTED

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

#: The event types published; a consumer takes all of them or a filtered few.
TYPES = ("order.created", "order.paid", "order.shipped")

Slowdown = Literal["none", "constant", "jitter", "pauses"]
#: How a consumer's handler is slowed down, each event awaiting a sleep of:
#: nothing; ``delay_s``; a uniform draw from 0 to twice ``delay_s``; or, with
#: chance ``pause_chance``, a pause of ``delay_s`` (else nothing).
SLOWDOWNS: tuple[Slowdown, ...] = ("none", "constant", "jitter", "pauses")
#: What a consumer draws from: half of them without sleeps, as many real handlers are.
_SLOWDOWN_DRAWS: tuple[Slowdown, ...] = ("none", "none", "none", "constant", "jitter", "pauses")
#: Seconds a constant or jittery handler awaits per event (a cache or RPC call).
HANDLER_DELAYS = (0.0005, 0.001, 0.002, 0.005)
#: Seconds of an occasional long pause (a slow query, a GC pause, a retry).
PAUSE_LENGTHS = (0.02, 0.05, 0.1, 0.2)
#: The chance that a pausing handler pauses on an event.
PAUSE_CHANCES = (0.001, 0.005, 0.01)
#: The share of a consumer's events whose first handling raises.
FAILURE_RATES = (0.0, 0.0, 0.001, 0.01, 0.05)
#: The share of a consumer's events that raise on every attempt (poison), for
#: consumers that give up (``on_exhausted`` ``"dead-letter"`` or ``"halt"``).
POISON_RATES = (0.0, 0.001, 0.01, 0.05)
#: ``Retry(attempts=...)``: the calls per event before a consumer gives up.
MAX_ATTEMPTS = 4
#: A consumer's ``timeout``: none, or longer than any sleep planned, so that
#: its cost is measured and a call it cuts short fails the check.
TIMEOUTS = (None, 1.0)
#: Events per publish call (1: ``publish``; more: ``publish_many``).
BATCH_SIZES = (1, 2, 10, 50, 200, 1_000)
#: Seconds the publisher awaits after each call (0: as fast as it can).
PUBLISH_INTERVALS = (0.0, 0.0, 0.001, 0.002, 0.005)
#: Approximate size of each event's data, as compact JSON.
EVENT_SIZES = (24, 64, 200, 500, 1_000, 4_000, 16_000, 40_000)
MAX_CONSUMERS = 16
MAX_BUFFER = 64
MAX_COMMIT_EVERY = 200
#: The range of event counts drawn, before the time budget below cuts it.
MIN_EVENTS = 50
MAX_EVENTS = 5_000

# The time budget. The event count drawn is cut so that a scenario should
# take about BUDGET_S on the memory store, by this rough model of its cost
# per event: the slowest consumer's sleeps, cursor commits and restarts, the
# publisher's pauses, and the CPU every delivery costs. A disk store takes
# longer; the commit term keeps commit_every=1 scenarios short there too.
BUDGET_S = 0.6
#: A sleep shorter than the event loop's timer resolution still costs about this.
TIMER_RESOLUTION_S = 0.001
#: What one durable cursor commit may cost on a disk store (an fsync).
DURABLE_COMMIT_S = 0.002
#: The backoff before a failed event's next attempt (``Retry``), and before a
#: restart after a store error (``RestartPolicy``): `BACKOFF_INITIAL_S`,
#: doubling up to `BACKOFF_MAXIMUM_S`. Short, so that injected failures
#: measure the retry path, not idling.
BACKOFF_INITIAL_S = 0.005
BACKOFF_MAXIMUM_S = 0.1
#: Seconds between the run's looks for halted consumers to resume.
HALT_WATCH_S = 0.002
#: CPU per delivery (one event to one consumer) and per byte published.
DELIVERY_COST_S = 15e-6
BYTE_COST_S = 10e-9
#: At most this many bytes of event data per scenario (the memory store keeps them all).
MAX_SCENARIO_BYTES = 16_000_000

Data = dict[str, object]


@attrs.frozen(kw_only=True)
class ConsumerPlan:
    """One consumer of a scenario.

    Attributes:
        slowdown: How its handler is slowed down (see `SLOWDOWNS`).
        delay_s: The sleep per event (``constant``), its mean (``jitter``),
            or the length of a pause (``pauses``); 0 for ``none``.
        pause_chance: For ``pauses``: the chance of a pause per event.
        failure_rate: The share of its events whose first handling raises
            (trioflow retries it in place; the second attempt succeeds).
        types: The event types it takes (sorted), or None for all.
        buffer: Its ``buffer=`` bound, or None (unbounded).
        commit_every: Its ``commit_every=``.
        salt: Seeds its per-event sleeps and failures.
        on_exhausted: Its ``on_exhausted=``: what giving up on an event means.
        attempts: Its ``Retry(attempts=...)``; with 1, an event whose first
            handling raises is given up on at once.
        timeout: Its ``timeout=`` (see `TIMEOUTS`).
        poison_rate: The share of its events that raise on every attempt
            (only when it gives up on events): each becomes a dead letter, or
            halts it until the run heals the event and resumes it.
    """

    slowdown: Slowdown
    delay_s: float
    pause_chance: float
    failure_rate: float
    types: tuple[str, ...] | None
    buffer: int | None
    commit_every: int
    salt: int
    on_exhausted: trioflow.OnExhausted = "retry-forever"
    attempts: int = 1
    timeout: float | None = None
    poison_rate: float = 0.0

    def takes(self, event_type: str) -> bool:
        """Whether its type filter lets ``event_type`` through."""
        return self.types is None or event_type in self.types

    def share(self) -> float:
        """The expected share of the events it takes."""
        return 1.0 if self.types is None else len(self.types) / len(TYPES)

    def mean_sleep(self) -> float:
        """The expected seconds its handler sleeps per event, rounded up to the timer's grain."""
        if self.slowdown in ("constant", "jitter"):
            return max(self.delay_s, TIMER_RESOLUTION_S)
        if self.slowdown == "pauses":
            return self.pause_chance * self.delay_s
        return 0.0

    def failure_cost(self) -> float:
        """The expected seconds of backoff (and halting) per event it takes."""
        poison = self.attempts * 2 * BACKOFF_INITIAL_S
        if self.on_exhausted == "halt":
            poison += HALT_WATCH_S
        return self.failure_rate * BACKOFF_INITIAL_S + self.poison_rate * poison

    def describe(self) -> str:
        """A short label: ``constant 1ms, fail 1%, poison 1%, dead-letter after 2, commit 10``."""
        parts = [_slowdown_label(self)]
        if self.failure_rate:
            parts.append(f"fail {self.failure_rate:.1%}")
        if self.poison_rate:
            parts.append(f"poison {self.poison_rate:.1%}")
        if self.on_exhausted != "retry-forever":
            parts.append(f"{self.on_exhausted} after {self.attempts}")
        if self.timeout is not None:
            parts.append(f"timeout {self.timeout:g}s")
        if self.types is not None:
            parts.append("types " + "+".join(self.types))
        if self.buffer is not None:
            parts.append(f"buffer {self.buffer}")
        parts.append(f"commit {self.commit_every}")
        return ", ".join(parts)


def _slowdown_label(plan: ConsumerPlan) -> str:
    if plan.slowdown == "none":
        return "no sleep"
    if plan.slowdown == "pauses":
        return f"pauses {plan.delay_s * 1000:g}ms at {plan.pause_chance:.1%}"
    return f"{plan.slowdown} {plan.delay_s * 1000:g}ms"


@attrs.frozen(kw_only=True)
class Scenario:
    """One generated scenario: who consumes, how events are published, how many.

    Attributes:
        number: Its place in the generated list, from 1 (what ``--only`` takes).
        events: Events published (N).
        event_bytes: Approximate size of each event's data, as JSON.
        batch_size: Events per publish call.
        publish_interval_s: Seconds the publisher awaits after each call.
        consumers: Its consumers, in registration order.
        salt: Seeds the events' types and data.
    """

    number: int
    events: int
    event_bytes: int
    batch_size: int
    publish_interval_s: float
    consumers: tuple[ConsumerPlan, ...]
    salt: int

    def describe(self) -> str:
        """One line: its size and publishing, and how many consumers of each slowdown."""
        kinds = [plan.slowdown for plan in self.consumers]
        slowdowns = ", ".join(f"{kinds.count(kind)} {kind}" for kind in SLOWDOWNS if kind in kinds)
        failing = sum(1 for plan in self.consumers if plan.failure_rate or plan.poison_rate)
        bounded = sum(1 for plan in self.consumers if plan.buffer is not None)
        policies = [plan.on_exhausted for plan in self.consumers]
        giving_up = "".join(
            f", {policies.count(policy)} {policy}"
            for policy in ON_EXHAUSTED
            if policy != "retry-forever" and policy in policies
        )
        return (
            f"K={len(self.consumers)} N={self.events:,} {self.event_bytes:,}B "
            f"batch {self.batch_size} every {self.publish_interval_s * 1000:g}ms; "
            f"{slowdowns}; {failing} failing, {bounded} bounded{giving_up}"
        )

    def to_json(self) -> dict[str, object]:
        """Every parameter, as plain JSON values (for the results file)."""
        return attrs.asdict(self)


def fit_events(
    requested: int,
    consumers: Sequence[ConsumerPlan],
    *,
    event_bytes: int,
    batch_size: int,
    publish_interval_s: float,
) -> int:
    """Cut ``requested`` to what fits `BUDGET_S` by the cost model above (at least `MIN_EVENTS`)."""
    slowest = max(
        plan.share()
        * (plan.mean_sleep() + DURABLE_COMMIT_S / plan.commit_every + plan.failure_cost())
        for plan in consumers
    )
    per_event = (
        slowest
        + max(publish_interval_s, TIMER_RESOLUTION_S if publish_interval_s else 0.0) / batch_size
        + len(consumers) * DELIVERY_COST_S
        + event_bytes * BYTE_COST_S
    )
    fitting = min(requested, int(BUDGET_S / per_event), MAX_SCENARIO_BYTES // event_bytes)
    return max(fitting, MIN_EVENTS)


def scenario_strategy() -> SearchStrategy[Scenario]:
    """The Hypothesis strategy drawing one `Scenario` (its ``number`` left at 0)."""
    from hypothesis import strategies as st

    salts = st.integers(min_value=0, max_value=2**32 - 1)

    @st.composite
    def consumer_plans(draw: st.DrawFn) -> ConsumerPlan:
        slowdown = draw(st.sampled_from(_SLOWDOWN_DRAWS))
        delay_s, pause_chance = 0.0, 0.0
        if slowdown in ("constant", "jitter"):
            delay_s = draw(st.sampled_from(HANDLER_DELAYS))
        elif slowdown == "pauses":
            delay_s = draw(st.sampled_from(PAUSE_LENGTHS))
            pause_chance = draw(st.sampled_from(PAUSE_CHANCES))
        types = draw(
            st.none()
            | st.lists(st.sampled_from(TYPES), min_size=1, max_size=len(TYPES) - 1, unique=True)
        )
        on_exhausted = draw(st.sampled_from(ON_EXHAUSTED))
        return ConsumerPlan(
            slowdown=slowdown,
            delay_s=delay_s,
            pause_chance=pause_chance,
            failure_rate=draw(st.sampled_from(FAILURE_RATES)),
            types=None if types is None else tuple(sorted(types)),
            buffer=draw(st.none() | st.integers(min_value=1, max_value=MAX_BUFFER)),
            commit_every=draw(st.integers(min_value=1, max_value=MAX_COMMIT_EVERY)),
            salt=draw(salts),
            on_exhausted=on_exhausted,
            attempts=draw(st.integers(min_value=1, max_value=MAX_ATTEMPTS)),
            timeout=draw(st.sampled_from(TIMEOUTS)),
            # A consumer that retries forever would never get past a poison event.
            poison_rate=0.0
            if on_exhausted == "retry-forever"
            else draw(st.sampled_from(POISON_RATES)),
        )

    @st.composite
    def scenarios(draw: st.DrawFn) -> Scenario:
        count = draw(st.integers(min_value=1, max_value=MAX_CONSUMERS))
        consumers = tuple(draw(consumer_plans()) for _ in range(count))
        event_bytes = draw(st.sampled_from(EVENT_SIZES))
        batch_size = draw(st.sampled_from(BATCH_SIZES))
        publish_interval_s = draw(st.sampled_from(PUBLISH_INTERVALS))
        requested = draw(st.integers(min_value=MIN_EVENTS, max_value=MAX_EVENTS))
        return Scenario(
            number=0,
            events=fit_events(
                requested,
                consumers,
                event_bytes=event_bytes,
                batch_size=batch_size,
                publish_interval_s=publish_interval_s,
            ),
            event_bytes=event_bytes,
            batch_size=batch_size,
            publish_interval_s=publish_interval_s,
            consumers=consumers,
            salt=draw(salts),
        )

    return scenarios()


def generate(seed: int, count: int) -> list[Scenario]:
    """Draw ``count`` scenarios with Hypothesis: the same ones for the same ``seed``.

    Scenario ``i`` is drawn alone, by a Hypothesis run seeded with ``(seed,
    i)``, so it is the same whatever ``count`` is (``--scenarios 30`` extends
    the list of 20) and scenarios are independent: one run's examples are not
    (it explores around the examples it drew), and its first is always the
    simplest. Each run has only the generate phase (no example database, no
    shrinking): the scenarios are collected here and run afterwards, so that
    Hypothesis never times or repeats them.
    """
    return [draw_one(seed, number) for number in range(1, count + 1)]


def draw_one(seed: int, number: int) -> Scenario:
    """Scenario ``number`` of ``seed``: the first random example of a run seeded with both."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as with_seed

    drawn: list[Scenario] = []

    @with_seed(f"{seed}:{number}")
    @settings(
        # The first example is the simplest one; the second is random.
        max_examples=2,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        derandomize=False,
        verbosity=Verbosity.quiet,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )
    @given(scenario_strategy())
    def collect(scenario: Scenario) -> None:
        drawn.append(scenario)

    collect()
    return attrs.evolve(drawn[-1], number=number)


def limit(scenario: Scenario, *, max_events: int, max_consumers: int) -> Scenario:
    """``scenario`` with at most ``max_events`` events and its first ``max_consumers`` consumers."""
    return attrs.evolve(
        scenario,
        events=min(scenario.events, max_events),
        consumers=scenario.consumers[:max_consumers],
    )


@attrs.frozen(kw_only=True, eq=False)
class Prepared:
    """A scenario's exact inputs, built before it runs (not timed).

    Attributes:
        types: Each event's type, by index (0 to N-1).
        data: Each event's data; its ``"i"`` is the index, which handlers
            read to find their sleep and planned failure.
        batches: The event indexes of each publish call, in order.
        sleeps: Per consumer: the seconds its handler sleeps on each event.
        failing: Per consumer: the indexes of its events whose first handling raises.
        poison: Per consumer: the indexes of its events that raise on every
            attempt (until healed), none of them in ``failing``.
    """

    types: Sequence[str]
    data: Sequence[Data]
    batches: Sequence[range]
    sleeps: Sequence[Sequence[float]]
    failing: Sequence[frozenset[int]]
    poison: Sequence[frozenset[int]]

    def expected(self, plan: ConsumerPlan) -> list[int]:
        """The indexes of the events ``plan``'s consumer takes, in order."""
        return [index for index, event_type in enumerate(self.types) if plan.takes(event_type)]

    def given_up(self, number: int, plan: ConsumerPlan) -> list[int]:
        """The indexes of the events consumer ``number`` (from 0) gives up on, in order:
        its poison events, and with ``attempts=1`` those whose first handling raises."""
        if plan.on_exhausted == "retry-forever":
            return []
        failing = self.failing[number] if plan.attempts == 1 else frozenset()
        return sorted(self.poison[number] | failing)


def prepare(scenario: Scenario) -> Prepared:
    """Build ``scenario``'s inputs from its salts: the same on every call."""
    n = scenario.events
    rng = random.Random(f"scenario:{scenario.salt}")
    types = [rng.choice(TYPES) for _ in range(n)]
    data = [
        make_data(index, event_type, scenario.event_bytes) for index, event_type in enumerate(types)
    ]
    batches = [
        range(start, min(start + scenario.batch_size, n))
        for start in range(0, n, scenario.batch_size)
    ]
    sleeps: list[Sequence[float]] = []
    failing: list[frozenset[int]] = []
    poison: list[frozenset[int]] = []
    for number, plan in enumerate(scenario.consumers):
        rng = random.Random(f"consumer:{scenario.salt}:{number}:{plan.salt}")
        sleeps.append(_sleeps(plan, n, rng))
        failing.append(_drawn(plan, types, plan.failure_rate, rng))
        rng = random.Random(f"poison:{scenario.salt}:{number}:{plan.salt}")
        poison.append(_drawn(plan, types, plan.poison_rate, rng) - failing[-1])
    return Prepared(
        types=types, data=data, batches=batches, sleeps=sleeps, failing=failing, poison=poison
    )


def _drawn(
    plan: ConsumerPlan, types: Sequence[str], rate: float, rng: random.Random
) -> frozenset[int]:
    """The indexes of a share ``rate`` of the events ``plan`` takes, drawn with ``rng``."""
    return frozenset(
        index
        for index, event_type in enumerate(types)
        if plan.takes(event_type) and rng.random() < rate
    )


def _sleeps(plan: ConsumerPlan, n: int, rng: random.Random) -> Sequence[float]:
    if plan.slowdown == "constant":
        return [plan.delay_s] * n
    if plan.slowdown == "jitter":
        return [rng.uniform(0.0, 2 * plan.delay_s) for _ in range(n)]
    if plan.slowdown == "pauses":
        return [plan.delay_s if rng.random() < plan.pause_chance else 0.0 for _ in range(n)]
    return [0.0] * n


def make_data(index: int, event_type: str, size: int) -> Data:
    """Order-like JSON of about ``size`` bytes (at least ``{"i":...,"note":""}``)."""
    data: Data = {"i": index}
    if size >= 200:
        data["customer"] = f"customer-{index % 9973:05d}"
        data["status"] = event_type
        # Structure grows with size (up to 50 line items), as real events do;
        # the rest is text.
        data["items"] = [
            {"sku": f"sku-{(index * 7 + line) % 1000:05d}", "qty": 1 + line % 3, "cents": 499}
            for line in range(min(size // 400, 50))
        ]
    data["note"] = ""
    used = len(json.dumps(data, separators=(",", ":")))
    data["note"] = "x" * max(size - used, 0)
    return data
