"""hasten's Gradio demo apps, one module per demo (``grat_app.py``, ...), sharing :mod:`hasten.apps.launcher`.

Launch one with ``hasten app NAME`` (``hasten app --list`` lists them) or ``python -m hasten.apps.NAME_app``.
"""
