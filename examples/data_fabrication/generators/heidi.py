"""Heidi: caches far more than the memory limit allows."""

cache = []
while True:
    cache.append(bytearray(32 << 20))
