"""run_folder.py: an output folder as a cluster treats it from outside: moved, launched into twice, filled up.

A support module, read after checkpoints.py. coin.py's --out and evaluate.py's results folder

  - may move. config.json, the checkpoints and the adapters store a path inside the run folder relative to the
    folder of the file that holds it (`stored`): `out` itself as ".", the base --tiny builds as "base" (in a
    checkpoint, "../base"). A path outside it (the data, a downloaded base, an adapter) is stored resolved, as
    it was when the run started. A copied or moved run continues with `coin.py --out NEWPLACE --resume`, and
    `evaluate.py --ckpt NEWPLACE` finds its base; --resume names a stored path that has gone since, with the
    flag that gives its new place (flags.merge_saved).
  - belong to one process at a time (`claim`). The main process holds an exclusive fcntl.flock on
    folder/.lock, which holds its pid; a second process on the folder is refused at once, in one line naming
    the folder and that pid. The kernel drops a flock with its process, however it ends: a SIGKILL leaves the
    file but no lock, and the next process takes it. A clean end removes the file (and a folder that the
    process made and left empty: a run refused for bad input leaves nothing).
  - may fill up. A write that finds no room (files.SPACE: a full disk, a used-up quota, the file size limit
    of `ulimit -f`) ends the process with one line naming the file and the space left on its disk, and exit
    status IOERR (74), which a job script tells from 0 (done), 1 (an error) and 75 (stopped by a signal,
    saved). Every file is written atomically, so the one being written stays as it was, its temporary is
    removed, and the checkpoints before it are intact: make room, then --resume.
"""
import errno
import fcntl
import os
import resource
import shutil
import sys
from contextlib import contextmanager, suppress
from pathlib import Path

from files import SPACE, naming, read_json

IOERR = 74  # the exit status of a write that found no room: sysexits.h's EX_IOERR
LOCK = ".lock"  # the file in a held folder that the holder locks


def stored(path, folder, run):
    """How a file in `folder` records `path` (None: none): relative to `folder` if `path` lies inside the run
    folder `run` (so that the run folder may move), else resolved."""
    if not path:
        return None
    path, run = Path(path).resolve(), Path(run).resolve()
    if path != run and run not in path.parents:
        return str(path)
    return os.path.relpath(path, Path(folder).resolve())


def run_base(ckpt):
    """The base model named by the config.json of coin.py's output folder, or of one of its checkpoints:
    relative to `ckpt` when stored so (a base that --tiny built inside the run folder)."""
    config = ckpt / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: not found; it names the base model (or pass --base)")
    base = read_json(config).get("base")
    if not base:
        raise ValueError(f"{config}: no 'base' entry naming the base model; pass --base")
    return ckpt / base


@contextmanager
def claim(folder, main=True, kept="the files written before it are kept"):
    """A context in which this process holds `folder` (made if missing; of several processes, the main one
    alone holds it) and a write that finds no room exits with IOERR, in a line that ends with `kept`."""
    folder, lock = Path(folder), None
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: a file, not a directory; give --out a directory")
    try:
        lock = take(folder) if main else None
        yield
    except OSError as e:
        if e.errno not in SPACE:
            raise
        print(no_room(e, kept), file=sys.stderr)
        raise SystemExit(IOERR) from None
    finally:
        if lock:
            release(*lock)


def take(folder):
    """(lock file, folder, whether this made it) once this process holds folder/LOCK; a ValueError naming
    the holder's pid while another process holds it."""
    made = not folder.exists()
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / LOCK, "a+")  # a+: made if missing, and not emptied before it is held
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "not written yet"
            lock.close()
            raise ValueError(f"{folder}: in use by another process (pid {holder}); wait for it to end, or "
                             "give another folder") from None
        except OSError as e:  # a filesystem without flock (Lustre mounted without -o flock): go on, unguarded
            print(f"warning: {folder}: cannot lock {LOCK} ({e.strerror}); a second process is not refused")
            break
        with suppress(FileNotFoundError):  # a holder that ended meanwhile removed the file this one locked
            if os.path.samestat(os.fstat(lock.fileno()), os.stat(lock.name)):
                break
        lock.close()
    with naming(lock.name):
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
    return lock, folder, made


def release(lock, folder, made):
    """Give the folder up. The lock file goes while still held: a process that opened it meanwhile finds,
    once it holds it, that it is no longer the folder's, and tries again (take). Then the folder goes, if this
    process made it and left it empty."""
    Path(lock.name).unlink(missing_ok=True)
    if made:
        with suppress(OSError):
            folder.rmdir()
    lock.close()


def no_room(e, kept):
    """The one line that says which write found no room (e: its OSError), and what is left on the disk."""
    where = Path(e.filename or ".").absolute()
    while not where.exists():  # the file itself may be gone: its temporary was removed
        where = where.parent
    why, limit = e.strerror, resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if e.errno == errno.EFBIG and limit != resource.RLIM_INFINITY:
        why += f" (over the file size limit of {limit} bytes: ulimit -f)"
    free = shutil.disk_usage(where).free / 2**30
    return (f"error: {e.filename or 'an unnamed file'}: {why}; {free:.2f} GiB free on its disk; {kept}: make "
            f"room, then --resume (exit status {IOERR})")
