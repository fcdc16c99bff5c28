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
        self.records = {}   # id -> record: one record reaches several handlers

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "torch" or record.name.startswith("torch."):
            self.records[id(record)] = record
            return False
        return True


def _torch_handlers() -> list:
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "torch" or name.startswith("torch.")]
    handlers = {id(h): h for logger in loggers + [logging.getLogger()] for h in logger.handlers}
    return list(handlers.values())


@contextlib.contextmanager
def torch_logs_held():
    """Records of torch's loggers and stderr are held while the block runs; passed on only if it succeeds."""
    holder, printed = _Holder(), io.StringIO()
    with _lock:
        handlers = _torch_handlers()
        for handler in handlers:
            handler.addFilter(holder)
    try:
        with contextlib.redirect_stderr(printed):
            yield
    except BaseException:
        holder.records.clear()
        raise
    finally:
        with _lock:
            for handler in handlers:
                handler.removeFilter(holder)
    sys.stderr.write(printed.getvalue())
    for record in holder.records.values():
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
