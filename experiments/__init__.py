"""Research harness of dtriv: orthogonal RNNs on the copying, adding and pixel-digit tasks.

Run ``python -m experiments --help``; see ``experiments/README.md``.
"""
