"""`make bench`: runs every `bench/bench_*.py` in turn (one process each, so none warms another)."""

import subprocess
import sys
from pathlib import Path


def main() -> int:
    selected = sys.argv[1:]
    scripts = sorted(Path(__file__).parent.glob("bench_*.py"))
    failures = 0
    for script in scripts:
        if selected and not any(name in script.stem for name in selected):
            continue
        print(f"\n### {script.stem}\n", flush=True)
        failures += subprocess.call([sys.executable, str(script)]) != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
