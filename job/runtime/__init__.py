"""The training runtime: the per-worker loop, the Ray and one-process sessions that run it,
distributed helpers, the guards, the quality probe and the placement of workers on a cluster.
"""
