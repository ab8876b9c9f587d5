"""``make bench``: the service's overhead, the API's cost and the engines' speed, each
measured against its baseline in the same run (issue 8).

Run it with ``python -m benchmarks.run`` (``make bench``). Each part starts the servers it
needs on 127.0.0.1, stops them by PID, keeps its files in a temp dir and is bounded in
time; a part whose dependency is missing prints ``not measured: <reason>``. The table is
printed and written to ``build/bench/latest.md``.
"""
