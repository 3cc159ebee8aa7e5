"""The shared `servers` fixture lives in tests/conftest.py."""
