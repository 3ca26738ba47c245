"""Atomic file writes: a crash mid-way never leaves a half-written file behind."""
from __future__ import annotations

import glob
import os
import tempfile
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:  # reading the umask means setting it: briefly, under a lock
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes, private: bool = False) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it: readers see the old file or
    the new one, never a part. The temp file is created 0600 and opened up to what the umask
    allows only before the rename (`private`: it stays 0600, for keys and what only the user may
    read), so no reader ever sees it with looser modes. A writer killed outright (SIGKILL, power
    loss) can leave only its temp file, named with its pid; a later write of the same path removes
    the temp files of writers that are gone, never those of a writer still at work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-{threading.get_ident()}.", suffix=".tmp",
                               dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not private:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete temp files an interrupted atomic write of `path` left behind (their writer's pid is
    gone); returns them. Temp files of live writers are theirs to rename."""
    path = Path(path)
    found = list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp")) if path.parent.is_dir() else []
    stale = [p for p in found if not _writer_alive(p, path.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _writer_alive(tmp: Path, name: str) -> bool:
    pid, _, tid = tmp.name[len(name) + 2:].split(".", 1)[0].partition("-")
    if not (pid.isdigit() and tid.isdigit()):
        return False  # not ours (an older format): stale
    if int(pid) == os.getpid():  # another thread of this process may be writing it right now
        return int(tid) != threading.get_ident() and int(tid) in {t.ident for t in threading.enumerate()}
    try:
        os.kill(int(pid), 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_png(path: str | Path, fig, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_csv(path: str | Path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """Rows of dicts as CSV (header from the first row unless given), atomically."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fieldnames or list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
