"""Levers: what each config group does to a loaded pipeline, one module per group.

Each lever is a pair of functions: one applies it (`apply(pipe, spec, device, info)`), one says what
applying it would do, from the spec alone, for the dry run (`describe(spec, device)`). sdbuild/builder.py
keeps the order they are applied in (`STEPS`) and nothing else. torch is imported inside the
functions, so importing a lever (as the dry run does) costs no torch import.
"""
