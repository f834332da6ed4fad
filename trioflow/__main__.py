"""``python -m trioflow``: the ``trioflow`` command (`trioflow.cli`)."""

from trioflow.cli import main

if __name__ == "__main__":
    main()
