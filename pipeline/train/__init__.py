"""Training: the driver of a run, the loop every Ray Train worker runs, and exact metrics.

driver    run(cfg): data -> Ray -> TorchTrainer -> MLflow -> registry (what jobs/train.py does)
worker    TrainLoop (one replica's loop, §5) and LoopSettings, what the driver hands every worker
batches   input_batches: the batches a worker consumes, on the host or decoded on its GPU
recipe    §5: the optimiser, the schedule, the precision of a step, per-step seeds
metrics   EvalSums and validate: top-1 / top-5 from summed counts, exact across workers
"""
