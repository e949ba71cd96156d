"""One traceback per failure in a run's logs.

Prefect logs a failing task's exception with its traceback, then again for every flow run it passes
through on its way up (a DNS error three levels down: four tracebacks, ~200 lines). The first one
says where it happened; the later ones only that it passed by. :class:`OneTraceback` keeps the
first and turns each repeat into its one error line (the message stays, the traceback goes).
"""

from __future__ import annotations

import logging
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
