"""The Streamlit dashboard: a read-only browser over run folders.

``app/main.py`` is the Streamlit script (``oisd dashboard`` runs it through
:func:`app.launch.launch`); ``app/data.py`` holds the cached readers (everything is
read through :mod:`workbench.storage.runstore`, never by running a model); ``app/figures.py``
builds the Plotly figures from tidy tables; ``app/views/`` renders one view each.
"""
