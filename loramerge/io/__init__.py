"""The I/O layer: sources (paths, Hub ids), adapter formats, checkpoints, single files and atomic output.

Readers turn every format into the core :class:`~loramerge.core.adapter.Adapter`; writers start from it.
"""
