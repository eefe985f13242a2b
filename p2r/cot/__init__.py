"""Process-aware CoT generation (METHOD.md, "Three-step CoT generation"): teacher, verify, judge.

``tools/generate_cot.py`` is the command line; :func:`run_pipeline` is the same in-process.
"""

from p2r.cot.pipeline import RecordFileSource, RunReport, ShardSource, run_pipeline
from p2r.cot.prompt import teacher_prompt
from p2r.cot.stats import format_table, summarize
from p2r.cot.teachers import BackboneTeacher, OpenAIChatTeacher, Teacher, TeacherReply, TeacherRequest

__all__ = [
    "BackboneTeacher",
    "OpenAIChatTeacher",
    "RecordFileSource",
    "RunReport",
    "ShardSource",
    "Teacher",
    "TeacherReply",
    "TeacherRequest",
    "format_table",
    "run_pipeline",
    "summarize",
    "teacher_prompt",
]
