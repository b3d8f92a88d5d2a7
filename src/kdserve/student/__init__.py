"""The student: registers teachers and reads one merged, re-batched stream of knowledge."""

from kdserve.student.student import Student

__all__ = ["Student"]
