"""The dashboard's views, one module each, every one a ``render(ctx)`` function.

``VIEWS`` maps the label shown in the sidebar (and written to the URL as ``view``)
to its renderer, in sidebar order.
"""

from __future__ import annotations

from app.views import alignment, attention, causal, drilldown, runs, training

VIEWS = {
    "Runs": runs.render,
    "Training": training.render,
    "Layer alignment": alignment.render,
    "Causal": causal.render,
    "Attention": attention.render,
    "Drill-down": drilldown.render,
}
