"""A seeded nemesis for the fleet: `python -m bench.chaos --seed S --minutes M`.

It starts a real fleet (bench/chaos/fleet.py), submits batches over the CLI and the HTTP API
(workload.py), injects faults on a schedule drawn from the seed (faults.py, through proxy.py and
receiver.py where a fault needs a go-between), waits until the fleet is quiet, checks the
protocol's invariants (invariants.py) and prints the result (report.py).
"""
