"""Fixtures shared by several test files."""

pytest_plugins = ["_head_world"]  # `setup` / `store` (the head-tuning world) and `one_thread`
