"""`gan-job tune`: a sweep of `train`'s settings on Ray Tune. Why: docs/tune.md"""
