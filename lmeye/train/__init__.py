"""Training the IPN: the loop each Ray Train worker runs (``loop``) and its parts: the DeepSpeed
engine and micro-step (``engine``), the data feed (``feed``) and data path (``data``), collectives
(``collectives``), checkpoints (``checkpoint``), metrics (``metrics``), validation (``evaluate``);
the DeepSpeed config (``ds_config``), the loss plot (``plot``), the driver's checks (``preflight``) and
where the model comes from (``model_factory``). The stage is ``pipelines.train``."""
