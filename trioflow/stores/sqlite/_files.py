"""The database file: created private, and checked to be the one that was opened.

SQLite goes on writing to a file deleted, moved or replaced while it is open,
so the store notes the file's identity when it opens it and checks it before
each write and each poll.
"""

from __future__ import annotations

import os

import attrs

from ..._errors import StoreError, StoreUnavailableError


def create_private(path: str, shown: str) -> None:
    """Create the file readable and writable by its owner only, unless it exists.

    SQLite would create it 0644 under the usual umask: every user of the
    machine could read the events. SQLite gives the -wal and -shm files
    the database file's mode, so they are private too. An existing file
    keeps the mode its owner chose.
    """
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise StoreUnavailableError(
            f"SQLite store {shown!r}: cannot create the file ({exc}); check that this "
            "process may write in its directory"
        ) from exc
    # An empty file is an empty database to SQLite.
    os.close(descriptor)


@attrs.frozen(kw_only=True, slots=True)
class OpenedFile:
    """The file a store opened: its absolute path, device and inode."""

    path: str
    device: int
    inode: int

    @classmethod
    def at(cls, path: str) -> OpenedFile:
        """The file ``path`` names now."""
        found = os.stat(path)
        return cls(path=path, device=found.st_dev, inode=found.st_ino)

    def check(self, shown: str) -> None:
        """Raise StoreError unless the path still names the file that was opened.

        SQLite goes on writing to a file deleted, moved or replaced while it
        is open, and publishes would go on succeeding into a file no one will
        open again. A stat of the path (a microsecond or two) tells.
        """
        path, device, inode = self.path, self.device, self.inode
        try:
            now = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise StoreError(
                f"SQLite store {shown!r}: the database file was deleted or moved away "
                "while the store was open, so nothing more is written: events and cursors "
                "committed since are not in the file the path names now (there is none). "
                "Stop every process using the store, put the file back with its -wal and -shm "
                "files (or restore a backup, or start afresh), then start them again"
            ) from None
        except OSError as exc:
            raise StoreUnavailableError(
                f"SQLite store {shown!r}: cannot check that the database file is still "
                f"there ({exc}); check the permissions of its directory"
            ) from exc
        if (now.st_dev, now.st_ino) != (device, inode):
            raise StoreError(
                f"SQLite store {shown!r}: the database file was replaced by another file "
                f"while the store was open (device {device} inode {inode}, now device "
                f"{now.st_dev} inode {now.st_ino}), so nothing more is written: events and "
                "cursors committed since are in the file that was replaced, not in the file "
                "the path names now. Stop every process using the store, keep the file you "
                "want at the path (with its own -wal and -shm files), then start them again"
            )


def check_directory(path: str, shown: str) -> None:
    """Raise StoreUnavailableError unless the directory of ``path`` (absolute) exists."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        # sqlite3 would only say "unable to open database file".
        raise StoreUnavailableError(
            f"SQLite store {shown!r}: directory {directory!r} does not exist; "
            "create it first (trioflow creates the file, not its directory)"
        )
