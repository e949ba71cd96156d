"""Run logs that hold the project's lines: one traceback per failure, and no third-party noise.

Prefect logs a failing task's exception with its traceback, then again for every flow run it passes
through on its way up (a DNS error three levels down: four tracebacks, ~200 lines). The first one
says where it happened; the later ones only that it passed by. :class:`OneTraceback` keeps the
first and turns each repeat into its one error line (the message stays, the traceback goes).

Libraries the stages use print lines that ask nothing of anyone: :func:`quiet_libraries` turns them off
where they start (known warnings by message and module, a library's logger by name), and
:func:`quiet_nncf` NNCF's INFO lines and progress bars before the optimize stage quantizes. Every other
warning and every error still shows.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict

RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


class OneTraceback(logging.Filter):
    """Drops the traceback of a record whose exception (type and message) was already logged with one."""

    def __init__(self, remember: int = 256) -> None:
        super().__init__()
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._remember = remember

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[1] is None:
            return True
        error = record.exc_info[1]
        key = (type(error).__qualname__, str(error))
        if key in self._seen:
            record.exc_info, record.exc_text = None, None
        else:
            self._seen[key] = None
            if len(self._seen) > self._remember:
                self._seen.popitem(last=False)
        return True


SHARED = OneTraceback()
"""One filter for task and flow run loggers alike, so a task's exception is remembered by its flows."""


def keep_one_traceback() -> None:
    """Install :class:`OneTraceback` on Prefect's run loggers (once per process)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneTraceback) for f in logger.filters):
            logger.addFilter(SHARED)


KNOWN_WARNINGS = (
    # openvino.convert_model traces the network with torch.jit (the optimize stage); nothing here calls it
    (r"`torch\.jit\.trace(_method)?` is deprecated", FutureWarning, r"torch\.jit\._trace"),
)
"""(message, category, module) of third-party warnings that need no action here, as ``warnings.filterwarnings``
reads them: each matches one warning of one module."""

QUIET_LOGGERS = {
    # "No CUDA runtime is found, using CUDA_HOME=...", logged when imported on a machine without CUDA: nothing
    # here builds a C++/CUDA extension
    "torch.utils.cpp_extension": logging.ERROR,
}


def quiet_libraries() -> None:
    """Turn off the third-party lines in :data:`KNOWN_WARNINGS` and :data:`QUIET_LOGGERS` for this process
    (importing any task does, as it installs :class:`OneTraceback`)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def quiet_nncf() -> None:
    """NNCF's INFO lines and progress bars off; its warnings and errors stay. NNCF sets its logger to INFO when
    it is imported, so this imports it (the optimize stage is about to) and then lowers it; the progress bars
    draw on rich's global console, which nothing else in a flow run writes to (Prefect's handlers have their
    own). Where NNCF cannot be imported this does nothing: the optimize stage says why it serves the eager model."""
    try:
        import nncf
    except ImportError:
        return
    import rich

    nncf.set_log_level(logging.WARNING)
    rich.reconfigure(quiet=True)
