"""Training: the driver of a run, the loop every Ray Train worker runs, and exact metrics.

    driver    run(cfg): data -> Ray -> TorchTrainer -> MLflow -> registry (what jobs/train.py does)
    worker    train_loop_per_worker, train_one_epoch, input_batches: one replica's loop (§5)
    metrics   EvalSums and validate: top-1 / top-5 from summed counts, exact across workers
"""
