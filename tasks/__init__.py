"""Prefect tasks, one module per stage. Importing any of them keeps one traceback per failure in run logs and
turns off the libraries' noise (tasks/logs.py)."""

from tasks.logs import keep_one_traceback, quiet_libraries

keep_one_traceback()
quiet_libraries()
