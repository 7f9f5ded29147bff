"""nbgrader settings of the sample course (tests/grading/test_nbgrader.py grades it)."""

c = get_config()  # noqa: F821  (nbgrader provides it)

c.CourseDirectory.course_id = "sandbox-101"
