"""Public helpers for testing code built on trioflow, and trioflow's own backends.

`FaultyStore` wraps a store to count its calls and make them fail on demand.

`StoreContract` is the store contract as a pytest test class: subclass it to
check a `trioflow.stores.Store` implementation. It needs pytest, pytest-trio
and Hypothesis (the ``test`` extra), so it is imported only when asked for.
"""

from typing import TYPE_CHECKING, Any

from ._faults import FaultyStore as FaultyStore

if TYPE_CHECKING:
    from ._store_contract import StoreContract as StoreContract

__all__ = ["FaultyStore", "StoreContract"]


def __getattr__(name: str) -> Any:
    if name == "StoreContract":
        from ._store_contract import StoreContract

        return StoreContract
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
