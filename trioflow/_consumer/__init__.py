"""One consumer's life: recover from its cursor, replay, go live, apply its policy.

Start-up and restart are one code path (`Consumer._incarnation`): load the
durable cursor, replay from the store up to the live stream, then take
batches from the consumer's `Subscription`. A batch that starts past the
consumer's position means it missed events (it was detached, or just
restarted): it reads them from the store before going on. Events at or below
its position are skipped. Together these make the seam between replay and
live exact: no gap, no duplicate.

A handler failure (an exception, or its timeout) is retried in place, after
the backoff of the consumer's `DeliveryPolicy`, before any later event; when
the policy gives up, the event becomes a dead letter (recorded with the
cursor moved past it, in one store transaction) or the consumer halts at it
until resumed. A store error ends the incarnation: its cancel scope is
cancelled and, after a backoff, a new incarnation starts from the durable
cursor (or the position already reached, if further), by the start-up path.

A batch consumer (``batch=``) takes the same path; its handler is called
once per batch of up to ``batch`` events (`trioflow._consumer._batches`), and a batch
that fails for good is narrowed down to single events (one-event batches),
which take this module's per-event path.

Who owns what: a `Consumer` owns its position and counters; its feed belongs
to the dispatcher (`Subscription`), its cursor progress to the cursor writer
(`CursorProgress`); it changes those only through their owners' methods.

The package is divided by job; each module adds one to the consumer, whose
state has one owner (`ConsumerState`: a `Consumer` is one object, its
classes one chain, each using only those below it):

* ``_runner``: `ConsumerRunner` (what a flow's consumers share, and stopping
  them) and `Consumer`: its public methods, its life as owner or stand-by,
  incarnations (start-up, the live loop), restarts after store errors.
* ``_startup``: its first cursor, and refusing a stored cursor pruned past.
* ``_replay``: replay and catch-up from the store.
* ``_handling``: handling what it took, shielded, with the redelivery bound.
* ``_batches``: a batch consumer's filling and handling of batches.
* ``_requeues``: requeued dead letters.
* ``_failures``: the delivery policy after a failure: retries, backoff,
  dead letters, halts.
* ``_calls``: handler invocation: plain, timed, transactional, on batches.
* ``_state``: the state it owns, and the questions every part asks of it.
"""

from ._runner import Consumer as Consumer
from ._runner import ConsumerRunner as ConsumerRunner
from ._runner import handler_of as handler_of
