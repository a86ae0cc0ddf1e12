"""kdcache.train: the model family, token data reader, trainer, evaluation and MODEL directories.

Entry points (import the submodules; this package imports nothing so the CLI stays fast):

- `tokens.open_token_data(DATA) -> TokenData`: the splits `kdcache prepare` wrote.
- `config.ModelConfig`, `model.build_model(cfg, seed=) -> Transformer` (ids -> logits).
- `model_dir.save_model_dir` / `model_dir.load_model_dir(MODEL) -> LoadedModel`: Hugging
  Face Llama directories (Qwen3 when QK-norm is on).
- `trainer.Trainer(model, source, loss_fn, LoopConfig)`: any `batches.BatchSource` and any
  `losses.LossFn`; `run.run_training(job.TrainJobConfig)` is `kdcache train`.
- Distillation: `store_batches.StoreBatches` (a logit store), `online.OnlineTeacherBatches`
  (a live teacher) and `kd_losses.DistillLoss`; all sources follow `row_order.RowOrder`.
- `evaluate.evaluate(model, data)`: validation cross-entropy and ECE (21 bins).
"""
