"""What the tests share that is not a test: reference implementations and worker scripts."""
