"""Run the fastopt benchmark: the same harness as ``python -m fastopt bench``.

    python bench/run.py                       # full CPU (+ GPU when usable) run
    python bench/run.py --quick --only adamw  # options as `python -m fastopt bench --help`
"""
import sys

from fastopt.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
