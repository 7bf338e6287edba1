"""The DCGAN of TensorFlow's tutorial in plain PyTorch: networks, losses, one step, data, plots.

Nothing in this package imports Ray or boto3, so it can be lifted into a notebook as it is.
"""
