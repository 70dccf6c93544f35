"""Test beds and the demo: network namespaces, a broker process, unprivileged consumers, a packet peer.

Tooling for `xskbroker demo`, the tests and the benchmarks. The daemon never imports it.
"""
