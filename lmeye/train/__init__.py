"""Training the IPN: the loop each Ray Train worker runs (``loop``), its data path (``data``),
checkpoints (``checkpoint``), DeepSpeed config (``ds_config``), validation (``evaluate``), the loss
plot (``plot``) and where the model comes from (``model_factory``). The stage is ``pipelines.train``."""
