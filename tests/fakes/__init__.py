"""Fakes for tests: real local servers that play outside services (fakes over mocks)."""
