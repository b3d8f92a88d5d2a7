"""The student: registers teachers and reads one merged, re-batched stream of knowledge."""

from kdserve.student.student import Loader, Student

__all__ = ["Loader", "Student"]
