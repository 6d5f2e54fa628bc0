"""Pieces the challenge examples share, each in one place.

* :mod:`~examples.common.submissions`: signed JSON submissions in object storage, keyed by
  the chain block they arrived in, verified against keys published as chain commitments;
* :mod:`~examples.common.similarity`: token shingles, Jaccard, MinHash and the copy /
  suspicious / original verdict;
* :mod:`~examples.common.settle`: raw scores → OpenSkill ratings and u16 weights on the chain;
* :mod:`~examples.common.table`: fixed-width text tables.
"""
