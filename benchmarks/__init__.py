"""Speed benchmarks against peer implementations (``python -m benchmarks.run``); not part of the tests."""
