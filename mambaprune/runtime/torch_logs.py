"""Hold back torch's log records and stderr during a call that may fail verbosely (torch.export).

A data-dependent export failure makes torch log "Unable to find user code corresponding to {u0}"
and print the whole traced graph to stderr (torch/export/_trace.py, thousands of lines) before it
raises; mambaprune turns the exception into one clear error, so both are held back while the
call runs: dropped when it fails, passed on unchanged when it succeeds.
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading

_lock = threading.Lock()


class _Holder(logging.Filter):
    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()
        self.records = {}   # id -> record: one record reaches several handlers

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self.thread and (record.name == "torch" or record.name.startswith("torch.")):
            self.records[id(record)] = record
            return False
        return True


def _torch_handlers() -> list:
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "torch" or name.startswith("torch.")]
    handlers = {id(h): h for logger in loggers + [logging.getLogger()] for h in logger.handlers}
    return list(handlers.values())


class _PerThreadStderr(io.TextIOBase):
    """sys.stderr while some thread holds torch's output: that thread's writes are buffered, other
    threads' go to the real stderr (so concurrent compiles neither swallow nor swap each other's)."""

    def __init__(self, real):
        super().__init__()
        self.real = real
        self.buffers = {}   # thread id -> [StringIO, ...] (nested holds)

    def write(self, text: str) -> int:
        held = self.buffers.get(threading.get_ident())
        return (held[-1] if held else self.real).write(text)

    def flush(self) -> None:
        self.real.flush()


_router = None


def _hold_stderr() -> io.StringIO:
    global _router
    with _lock:
        if _router is None:
            _router = _PerThreadStderr(sys.stderr)
            sys.stderr = _router
        buffer = io.StringIO()
        _router.buffers.setdefault(threading.get_ident(), []).append(buffer)
    return buffer


def _release_stderr() -> None:
    global _router
    with _lock:
        held = _router.buffers.get(threading.get_ident(), [])
        if held:
            held.pop()
        if not held:
            _router.buffers.pop(threading.get_ident(), None)
        if not _router.buffers:
            if sys.stderr is _router:
                sys.stderr = _router.real
            _router = None


@contextlib.contextmanager
def torch_logs_held():
    """Records of torch's loggers and this thread's stderr are held while the block runs; passed on
    only if it succeeds."""
    holder = _Holder()
    with _lock:
        handlers = _torch_handlers()
        for handler in handlers:
            handler.addFilter(holder)
    printed = _hold_stderr()
    try:
        yield
    except BaseException:
        holder.records.clear()
        raise
    finally:
        _release_stderr()
        with _lock:
            for handler in handlers:
                handler.removeFilter(holder)
    sys.stderr.write(printed.getvalue())
    for record in holder.records.values():
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
