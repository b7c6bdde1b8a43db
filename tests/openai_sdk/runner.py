"""The little test runner the SDK scripts share: every `test_*` function of a script, in name
order, each failure reported, then the plain 'N passed, M failed' summary tests/openai_sdk.rs
looks for, and a non-zero exit if any failed."""

import sys


def run(namespace, label):
    tests = [(n, f) for n, f in sorted(namespace.items()) if n.startswith("test_") and callable(f)]
    failed = 0
    for name, fn in tests:
        try:
            fn()
            print(f"ok   {name}")
        except Exception as e:  # report every failure, then exit non-zero
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
    print(f"{label}: {len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
