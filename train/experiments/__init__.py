"""Experiments that reproduce (or test) a paper's claim at this repo's scale; each writes its figures to docs/."""
