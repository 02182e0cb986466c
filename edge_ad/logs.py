"""Third-party log routing for the long CLI verbs (``edge-ad demo`` / ``convert``).

NNCF logs every quantizer decision at INFO on its own stdout handler ("Not adding activation
input quantizer ...": pages of it per conversion), which buries the verb's own progress lines.
:func:`third_party_logs` keeps those libraries' WARNING and above on the console as before and
writes *all* their records (INFO included) to a log file, so nothing is lost. Our own progress
(``[convert] ...``, ``[demo] ...`` lines) is printed as usual.

The library functions (:func:`edge_ad.converters.convert.convert`, :func:`edge_ad.demo.demo`)
leave logging alone (an application configures its own); the CLI verbs apply this.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["THIRD_PARTY_LOGGERS", "third_party_logs"]

#: Loggers routed by :func:`third_party_logs`.
THIRD_PARTY_LOGGERS = ("nncf", "openvino")


class _Divert(logging.Filter):
    """Logger filter: every record goes to the log file; only WARNING and above go on to the console."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        self.handler.handle(record)
        return record.levelno >= logging.WARNING


def _logger(name: str) -> logging.Logger:
    # NNCF installs its own Logger subclass when it is imported; creating its logger first (a plain
    # Logger) would break NNCF's *_once methods, so the library is imported before the logger is taken.
    if name not in logging.Logger.manager.loggerDict and importlib.util.find_spec(name) is not None:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a broken optional library: the verb reports it when it needs it
            pass
    return logging.getLogger(name)


@contextmanager
def third_party_logs(log_file: str | os.PathLike, names: Sequence[str] = THIRD_PARTY_LOGGERS) -> Iterator[Path]:
    """Within the block, the ``names`` loggers' records below WARNING go only to ``log_file`` (appended).

    Yields the log file's path. Filters and the file handler are removed on exit.
    """
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    divert = _Divert(handler)
    loggers = [_logger(name) for name in names]
    for lg in loggers:
        lg.addFilter(divert)
    try:
        yield path
    finally:
        for lg in loggers:
            lg.removeFilter(divert)
        handler.close()
