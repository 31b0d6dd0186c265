"""A stand-in for fourm/bench/ml4m_reference_worker.py in tests: the same JSON-lines protocol,
no torch. Scripted by environment variables (fourm.bench.reference passes the environment on):

FAKE_REF_TIMES: JSON list, one entry per `time` request: the seconds each timed call reports
    (a number = every call; a list = per call). Past its end the last entry repeats.
FAKE_REF_LOG: append one line per request: `<time.monotonic_ns()> <op> <key> <figure>`, so a test
    can interleave it with the fourm side's calls (CLOCK_MONOTONIC is the same in every process).
FAKE_REF_FAIL: a figure name whose `time` request answers with an error.
"""

import argparse
import json
import os
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ml4m_src", required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--interop_threads", type=int, default=0)
    p.add_argument("--keep_freed_memory", action="store_true")
    args = p.parse_args()
    script = json.loads(os.environ.get("FAKE_REF_TIMES", "[0.01]"))
    log = os.environ.get("FAKE_REF_LOG")
    n_time = 0

    def answer(d):
        sys.stdout.write(json.dumps(d) + "\n")
        sys.stdout.flush()

    answer(dict(ok=True, hello=dict(torch="fake", threads=args.threads or 2, interop_threads=2,
                                    keep_freed_memory=args.keep_freed_memory, ml4m_src=args.ml4m_src)))
    for line in sys.stdin:
        req = json.loads(line)
        if log:
            with open(log, "a") as f:
                f.write(f"{time.monotonic_ns()} {req['op']} {req.get('key', '-')} {req.get('figure', '-')}\n")
        if req["op"] == "quit":
            answer(dict(ok=True))
            return 0
        if req["op"] == "build":
            m = req["model"]
            hidden = int(2 * int(m["dim"] * m["mlp_ratio"]) / 3)  # 4M's gated-MLP rule
            answer(dict(ok=True, params=1, dim=m["dim"], encoder_depth=m["encoder_depth"],
                        decoder_depth=m["decoder_depth"], mlp_hidden=hidden, got_batch=req.get("batch"),
                        got_train=req.get("train")))
        elif req["op"] == "time":
            if req["figure"] == os.environ.get("FAKE_REF_FAIL"):
                answer(dict(ok=False, error=f"ValueError: scripted failure of {req['figure']}"))
                continue
            s = script[min(n_time, len(script) - 1)]
            n_time += 1
            times = s if isinstance(s, list) else [s] * req["iters"]
            answer(dict(ok=True, times=times, cpu=[2 * t for t in times], first_s=1.0, faults=10 * (req["iters"] + 1),
                        calls=req["iters"] + 1, output_shape=[1]))
        else:
            answer(dict(ok=False, error=f"unknown op {req['op']!r}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
