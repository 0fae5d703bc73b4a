"""Helpers shared by the test suites: generated test models and reference runs."""
