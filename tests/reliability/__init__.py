"""Fault-injection suite: the README's delivery guarantees under crashes, outages and hostile input.

Run it at CI size with ``pytest -m reliability -s``, at full size with ``python -m tests.reliability``
(see ``docs/reliability.md``).
"""
