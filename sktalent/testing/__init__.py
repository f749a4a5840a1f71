"""
What tests and benchmarks need to run sktalent as a real process: a server
on free ports, started and stopped, and bounded waits.
"""
