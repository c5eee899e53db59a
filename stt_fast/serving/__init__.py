"""Online serving on Ray Serve: `stt-fast serve` (app.py), what a request carries (uploads.py), what the
service counts (metrics.py). Installed with the `serve` extra: pip install 'stt-fast[serve]'."""
