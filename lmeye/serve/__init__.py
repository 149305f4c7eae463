"""Serving a trained IPN: chat (Python API and `lmeye chat`), the web demo (`lmeye app`) and the model
half of batch prediction. ``lmeye.serve.loader.load_assistant(checkpoint)`` is the one way in."""
