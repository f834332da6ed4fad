"""The exceptions trioflow raises.

Every error trioflow raises on purpose derives from one root, so callers can
catch them all at once::

    TrioflowError
    ├── ConfigurationError      bad App or consumer settings: name, handler, options
    │   └── UnknownStoreError   a store URL this version cannot open
    ├── InvalidEventError       an event that cannot be published (type, key, data)
    ├── FlowClosedError         publishing on a flow that has stopped or is stopping
    └── StoreError              the store failed or refused an operation
        ├── StoreUnavailableError   cannot reach or open the store; retrying may help
        ├── SchemaVersionError      the store holds a schema this version does not know
        └── OutcomeUnknownError     a publish was sent but never answered

An `InvalidEventError` or `FlowClosedError` from ``publish`` means nothing was
persisted. A `StoreError` from ``publish`` means the batch holding the event was
not committed (it was refused or rolled back, or never reached the store):
nothing was persisted and the call may be retried. The one exception is
`OutcomeUnknownError`: the batch reached the store but no answer came back (the
connection was lost and the store could not be asked again in time, or the
flow was stopped meanwhile). Then either all of the batch was committed, and
every consumer receives it, or none of it; retrying may persist it twice.
"""

from __future__ import annotations


class TrioflowError(Exception):
    """The root of every error trioflow raises on purpose."""


class ConfigurationError(TrioflowError):
    """An `App`, consumer or store setting is invalid.

    Raised at definition time (decorating a consumer, building an App), before
    anything touches a store.
    """


class UnknownStoreError(ConfigurationError):
    """A store URL names a scheme or form that this version of trioflow cannot open."""


class InvalidEventError(TrioflowError):
    """An event cannot be published: its type, key or data is invalid.

    Nothing was persisted; no other event of the same call was persisted either.
    """


class FlowClosedError(TrioflowError):
    """The flow has stopped (or is stopping) and accepts no more events."""


class StoreError(TrioflowError):
    """The store failed or refused an operation."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached or opened right now; retrying later may succeed."""


class SchemaVersionError(StoreError):
    """The store holds a schema version this version of trioflow does not know.

    Usually the store was written by a newer trioflow: upgrade trioflow, or point
    the App at another store.
    """


class OutcomeUnknownError(StoreError):
    """A publish reached the store but its answer was lost: it may have committed.

    Either the whole batch was committed (and every consumer receives it) or
    none of it. The message names an event id to look for before publishing
    again; retrying blindly may persist the events twice.
    """
