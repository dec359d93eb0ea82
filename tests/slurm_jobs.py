"""Functions the SLURM tests run as jobs (importable by the job from the repository root)."""

import time


def add(a: int, b: int) -> int:
    print(f"adding {a} and {b}", flush=True)
    return a + b


def fail(message: str) -> None:
    raise ValueError(message)


def sleep_then(seconds: float, value: str) -> str:
    time.sleep(seconds)
    return value
