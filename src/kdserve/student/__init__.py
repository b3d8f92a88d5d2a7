"""The student: registers teachers and reads one merged, re-batched stream of knowledge."""

from kdserve.student.student import Loader, Student
from kdserve.student.vocab_map import VocabMap

__all__ = ["Loader", "Student", "VocabMap"]
