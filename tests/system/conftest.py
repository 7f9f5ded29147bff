from tests.system_fixtures import classroom, shared_venv  # noqa: F401  (fixtures)
