"""Side-by-side benchmarks, one configuration per published result: ``python -m benchmarks list | run NAME | bench``."""
