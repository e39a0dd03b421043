"""Rank worlds: the processes a test's calls run in, how they are launched (spawned here, or by torchrun), laid out
(PP × EP), watched (collectives, stalls) and sized (threads, ranks per GPU, MPS)."""
