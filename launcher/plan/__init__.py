"""`gpu-run plan`: which host finishes a training run before the deadline for the least money.

tables.py holds the shipped figures (GPU training speed, model speed and FLOPs, with where each
came from), estimate.py the pure arithmetic (rates, bottleneck, time, cost, deadline and budget,
recommendation), gather.py the thin layer of I/O that feeds it (the ledger's past runs, a decode
measurement on a sample of the user's images, host settings), render.py the table and the JSON.
"""
