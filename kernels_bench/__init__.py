"""Throughput and memory benchmarks of the masked and spconv encoder backends, layer by layer and end to end."""
