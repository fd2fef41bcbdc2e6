"""Writing a user's output file whole or not at all."""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A fresh temp path beside `path` (same suffix, so writers that add one do not), renamed onto `path` when
    the block ends; removed if it fails. The file is created with mode 0o666, so the kernel applies the umask
    (mkstemp's files are 0600)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp{path.suffix}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)  # after a rename there is nothing left; never hide the real error
        except OSError:
            pass
