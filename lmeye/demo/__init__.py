"""The offline demo: a synthetic image-text corpus (`corpus`) and a loopback HTTP server (`server`).

Nothing is imported here on purpose: `python -m lmeye.demo.server` must not find its own module
already imported by the package, and the server should not pay for importing Pillow.
"""
