"""SynthWorld: a procedural world where every pixel's truth is known, to check that MoA learns.

``world`` renders it in FFHQ-wild's format, ``stage1`` trains a tiny prior on it, ``judges`` read
identity, context and subject masks from images, ``measure`` and ``report`` score and tabulate, and
``reproduce`` (``python -m moa.synthworld``) runs it all.
"""
