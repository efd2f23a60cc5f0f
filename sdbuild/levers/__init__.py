"""Levers: what one config group does to a loaded pipeline, one module per lever family.

sdbuild/builder.py keeps the order the levers are applied in and calls into these modules.
"""
