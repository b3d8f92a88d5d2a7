"""The teacher: runs a program over a reader and stores or serves its knowledge."""

from kdserve.teacher.teacher import Teacher

__all__ = ["Teacher"]
