"""The machine and the network: CPU sets and pinning, CurveZMQ keys, addresses, worker exits."""
