"""What the benchmark scripts share: timing one call and writing a result (printed, then saved as JSON)."""
import json, time
from pathlib import Path


def timed(fn) -> float:
    "Seconds one call of `fn` takes."
    t = time.perf_counter(); fn(); return time.perf_counter() - t


def write_result(result: dict, out: str, omit: tuple[str, ...] = ()) -> None:
    "Print `result` without the (long) keys in `omit`, and write all of it to `out` as JSON."
    print(json.dumps({k: v for k, v in result.items() if k not in omit}, indent=1))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
