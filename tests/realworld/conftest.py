"""The realistic project's own suite runs in a pytest process of its own (see
test_realworld.py), never as part of this one."""

collect_ignore = ["project"]
