"""Jobs that use a trained pipeline: evaluating a model, ablations, Figure 1, benchmarks, the device check.

evaluation      a saved model over a split, centre crop and ten crops (jobs/evaluate.py)
ablate          the paper's design choices switched off one at a time (jobs/ablate.py)
figure1         §3.1's Figure 1: ReLU against tanh
benchmark       the data path against torchvision's DataLoader (jobs/benchmark.py data)
gpu_benchmark   one GPU's step per precision and layout (jobs/benchmark.py gpu)
device_check    the first GPU hour's check (jobs/gpu_check.py)
"""
