"""The core layer: adapter types as pure data, linear algebra, rank policies, devices and reports.

Nothing here reads or writes a file or knows a format; every other layer builds on it.
"""
