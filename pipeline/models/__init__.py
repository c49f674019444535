"""The networks and where their parameters live.

alexnet      AlexNet as the 2012 paper describes it (§3), the torchvision variant, the 4-layer CNN of Figure 1
placement    the paper's two towers on two devices (§3.2), converting exactly to and from the grouped model
checkpoint   the one checkpoint format, written by training and read by tracking, evaluation and serving
"""
