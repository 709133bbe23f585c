"""Experiment configurations: each module has ``get_config(arg=None) -> Config``.

Run one with ``python -m gbjax.train --config gbjax/configs/NAME.py[:ARG]
--workdir DIR``; every module accepts ``ARG=smoke`` for a seconds-long check.
"""
