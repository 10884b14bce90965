"""A run's workdir: one run at a time (an exclusive lock), and files replaced whole or not at all.

The lock is ``fcntl.flock`` on ``workdir/.lock``, which holds the pid of its holder. The kernel drops
the lock when the holder exits, however it exits (SIGKILL included), so a lock left by a dead process
is never in force: the next run takes it and says whose it was. The file itself stays (deleting a
lock file races with a process that has just opened it); a clean exit empties it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile

LOCK_NAME = ".lock"


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """The exclusive lock of a workdir, held from :meth:`acquire` until :meth:`release` or exit.

  ``acquire`` raises :class:`WorkdirBusy` naming the holder's pid and changes nothing (the file is
  opened without truncation, and read, never written, when the lock is taken). ``stale_pid`` is the pid
  a previous holder left behind when it did not release (killed), else None.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd = None
    self.stale_pid: int | None = None

  def acquire(self) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_pid(fd)
      os.close(fd)
      who = f"process {holder}" if holder is not None else "another process"
      raise WorkdirBusy(f"workdir {os.path.dirname(self.path)!r} is in use by {who} (lock {self.path}); "
                        "wait for it to finish or use another workdir") from None
    previous = _read_pid(fd)
    self.stale_pid = previous if previous not in (None, os.getpid()) else None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _read_pid(fd: int) -> int | None:
  text = os.pread(fd, 64, 0).decode(errors="replace").strip()
  return int(text) if text.isdigit() else None


def write_text_atomic(path: str, text: str) -> None:
  """Replace ``path`` by ``text`` at once: a reader (or a crash) sees the old file or the new one, never half.

  The temporary file is named after this host and process, so that the processes of a multi-host run writing
  the same file at once do not clash.
  """
  tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_dir_atomic(final: str, write, marker: str) -> None:
  """Run ``write(tmp_dir)`` then move ``tmp_dir`` to ``final`` (a killed run leaves no half-written cache).

  ``final/marker`` exists once ``final`` is complete. The processes of a multi-host run build the same
  caches in the same workdir at once: when another one has published a complete ``final`` first, its copy
  is kept and this one dropped (the caller reads ``final`` back, so every process uses the same files). A
  ``final`` without its marker (left by an older layout) is replaced.
  """
  parent = os.path.dirname(os.path.abspath(final))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
  try:
    write(tmp)
    if os.path.isdir(final) and not os.path.isfile(os.path.join(final, marker)):
      shutil.rmtree(final, ignore_errors=True)
    try:
      os.replace(tmp, final)
    except OSError:  # a non-empty final: ENOTEMPTY or EEXIST
      if not os.path.isfile(os.path.join(final, marker)):
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
