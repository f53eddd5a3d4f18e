# Developer shortcuts (run inside the virtual environment: bash scripts/setup.sh && . .venv/bin/activate).
.PHONY: format lint test test-fast bench device-dry-run

format:
	ruff format .

lint:
	ruff check .
	ruff format --check .

test:
	python -m pytest -q -n 2

test-fast:  # the suite without the tests marked slow
	python -m pytest -q -n 2 -m "not slow"

bench:
	rmt-fast-bench all --out results

device-dry-run:  # benchmarks/device_check.sh on the CPU, as CI does
	python -m pytest -q tests/bench/test_device_check.py
