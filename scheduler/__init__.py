"""The engine loop: admission, batching, mode routing, cancellation, priorities, prefix cache.

Plain Python: no torch import. It turns many requests into a stream of packed forwards on a runner.
"""
