"""The kernel meter: load the tc classifier (program), attach it (attach), read its flow map (drain)
and its ring-buffer spill (spill). Only this package touches bcc, pyroute2 and bpf() calls."""

from ipfixer.sources.kernel.program import COUNTER_NAMES, LoadedProgram, load_program

__all__ = ["COUNTER_NAMES", "LoadedProgram", "load_program"]
