"""Figure styling shared by the dashboard's pages."""

from __future__ import annotations

import plotly.graph_objects as go


def title(text: str) -> dict:
    """A figure title at the top left, clear of the plot toolbar (top right)."""
    return dict(text=text, x=0.01, xanchor="left", y=0.98, yanchor="top")


def empty_figure(text: str, height: int = 300) -> go.Figure:
    """A figure that says why it has nothing to show."""
    fig = go.Figure()
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title(text), height=height, xaxis_visible=False, yaxis_visible=False)
    return fig
