"""hasten's Gradio demo apps, one file per demo (``grat_app.py``, ...), sharing :mod:`apps.launcher`."""
