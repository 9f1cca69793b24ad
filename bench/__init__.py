"""Chat fan-out benchmark: python -m bench --quick | --reference."""
