"""``python -m moa.synthworld``: the whole SynthWorld reproduction (see ``moa.synthworld.reproduce``)."""

from moa.synthworld.reproduce import main

main()
