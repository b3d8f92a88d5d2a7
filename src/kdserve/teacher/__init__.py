"""The teacher: runs a program over a reader and stores or serves its knowledge.

``Teacher`` is Pantheon's API; :func:`dump` and :func:`serve` are the same in one call.
"""

from kdserve.teacher.dump import dump
from kdserve.teacher.serve import Service, serve
from kdserve.teacher.teacher import Teacher

__all__ = ["Service", "Teacher", "dump", "serve"]
