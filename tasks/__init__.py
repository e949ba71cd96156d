"""Prefect tasks, one module per stage. Importing any of them keeps one traceback per failure in run logs."""

from tasks.logs import keep_one_traceback

keep_one_traceback()
