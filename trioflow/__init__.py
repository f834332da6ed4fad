"""trioflow: durable event fan-out on Trio's structured concurrency.

Events are persisted first, with increasing sequence numbers, then fanned out
to every consumer, each in strict order at its own pace with a durable
cursor. After any crash every consumer resumes from its cursor by replay.
"""

from ._app import App as App
from ._app import ConsumerOptions as ConsumerOptions
from ._app import ConsumerSpec as ConsumerSpec
from ._app import StartFrom as StartFrom
from ._dead_letters import DeadLetter as DeadLetter
from ._errors import BackpressureError as BackpressureError
from ._errors import BatchError as BatchError
from ._errors import ConfigurationError as ConfigurationError
from ._errors import ConsumerStateError as ConsumerStateError
from ._errors import FlowClosedError as FlowClosedError
from ._errors import HandlerTimeoutError as HandlerTimeoutError
from ._errors import InvalidEventError as InvalidEventError
from ._errors import LeaseLostError as LeaseLostError
from ._errors import OutcomeUnknownError as OutcomeUnknownError
from ._errors import PrunedLogError as PrunedLogError
from ._errors import QueryError as QueryError
from ._errors import Reject as Reject
from ._errors import SchemaVersionError as SchemaVersionError
from ._errors import StoreError as StoreError
from ._errors import StoreUnavailableError as StoreUnavailableError
from ._errors import TransactionClosedError as TransactionClosedError
from ._errors import TrioflowError as TrioflowError
from ._errors import UnknownConsumerError as UnknownConsumerError
from ._errors import UnknownDeadLetterError as UnknownDeadLetterError
from ._errors import UnknownStoreError as UnknownStoreError
from ._events import MAX_DATA_BYTES as MAX_DATA_BYTES
from ._events import MAX_DEPTH as MAX_DEPTH
from ._events import Event as Event
from ._flow import Flow as Flow
from ._flow import open_flow as open_flow
from ._flow import serve as serve
from ._histograms import HistogramSnapshot as HistogramSnapshot
from ._leases import Lease as Lease
from ._policies import OnExhausted as OnExhausted
from ._policies import Overflow as Overflow
from ._policies import RestartPolicy as RestartPolicy
from ._policies import Retry as Retry
from ._retention import PrunePlan as PrunePlan
from ._retention import PruneProgress as PruneProgress
from ._retention import PruneResult as PruneResult
from ._retention import Retention as Retention
from ._retention import plan_prune as plan_prune
from ._retention import run_prune as run_prune
from ._statistics import ConsumerStatistics as ConsumerStatistics
from ._statistics import FlowStatistics as FlowStatistics
from ._statistics import Readiness as Readiness
from ._transactions import Transaction as Transaction
from ._util import fixup_module_metadata as _fixup_module_metadata

__version__ = "0.1.0"

__all__ = [
    "MAX_DATA_BYTES",
    "MAX_DEPTH",
    "App",
    "BackpressureError",
    "BatchError",
    "ConfigurationError",
    "ConsumerOptions",
    "ConsumerSpec",
    "ConsumerStateError",
    "ConsumerStatistics",
    "DeadLetter",
    "Event",
    "Flow",
    "FlowClosedError",
    "FlowStatistics",
    "HandlerTimeoutError",
    "HistogramSnapshot",
    "InvalidEventError",
    "Lease",
    "LeaseLostError",
    "OnExhausted",
    "OutcomeUnknownError",
    "Overflow",
    "PrunePlan",
    "PruneProgress",
    "PruneResult",
    "PrunedLogError",
    "QueryError",
    "Readiness",
    "Reject",
    "RestartPolicy",
    "Retention",
    "Retry",
    "SchemaVersionError",
    "StartFrom",
    "StoreError",
    "StoreUnavailableError",
    "Transaction",
    "TransactionClosedError",
    "TrioflowError",
    "UnknownConsumerError",
    "UnknownDeadLetterError",
    "UnknownStoreError",
    "open_flow",
    "plan_prune",
    "run_prune",
    "serve",
]

_fixup_module_metadata(__name__, globals())
del _fixup_module_metadata
