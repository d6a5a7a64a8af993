"""Training with DeepSpeed: the typed train config, the DeepSpeed config (the one place that decides
the ZeRO stage), distributed start-up and collectives, the run directory's schema, backbone loading
and the methods, the LM loss, the trainer, checkpoints, export, preemption, telemetry and fault
injection. May import hycam_ds.modeling, hycam_ds.kernels and data_pipeline."""
